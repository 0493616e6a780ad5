"""A trained reward model exported for reuse: ``WORKDIR/reward_model_export``.

A run's reward-model stage ends by writing the model here: ``params.npz`` (every parameter,
keyed by its path in the tree), ``fingerprint.json`` (the settings it was trained under: the
SFT policy's, the value models' inputs and every ``reward_model.*`` field that shapes training
or its held-out report) and ``metrics.jsonl`` (the stage's logged rows). Another run starts
from it with ``reward_model.init_from`` instead of training the same model again: the study
trains one reward model per seed and every method that needs one reads it. Training is
deterministic given those settings, so a run that reads the export logs the same rows and
continues exactly as one that trained its own (tests/test_runner.py checks this).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from typing import Any

import jax
import numpy as np

from vcppo_jax import sft_export
from vcppo_jax.checkpoint import CheckpointMismatchError

EXPORT_DIR = "reward_model_export"
PARAMS = "params.npz"
ROWS = "metrics.jsonl"


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _storable(x) -> np.ndarray:
    """NumPy's own dtypes as they are; others (bfloat16) as float32, which holds them exactly
    and which ``load`` casts back."""
    x = np.asarray(x)
    return x if x.dtype.kind in "biuf" else x.astype(np.float32)


def export(workdir: str, params, fingerprint: dict[str, Any], rows: list[dict]) -> str:
    """Writes ``workdir/reward_model_export`` whole (through a temporary folder) and returns
    its path. ``params`` are host arrays; ``rows`` the stage's metric rows."""
    path = os.path.join(workdir, EXPORT_DIR)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    flat = {_key(p): _storable(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(tmp, PARAMS), **flat)
    with open(os.path.join(tmp, ROWS), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(tmp, sft_export.FINGERPRINT), "w") as f:
        json.dump(fingerprint, f, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def resolve(src: str, fingerprint: dict[str, Any]) -> str:
    """``reward_model.init_from`` (an export, or the workdir of the run that wrote one) -> the
    export's path, after checking it was trained under ``fingerprint``'s settings."""
    return sft_export.resolve(
        src,
        fingerprint,
        field="reward_model.init_from",
        export_dir=EXPORT_DIR,
        what="reward model",
        stage="reward_model",
    )


def load(path: str, like) -> tuple[Any, list[dict]]:
    """(parameters shaped as the tree ``like``, as host arrays; the stage's metric rows),
    refused with the differing leaves unless the export holds exactly ``like``'s leaves with
    its shapes."""
    file = os.path.join(path, PARAMS)
    try:
        with np.load(file) as saved:
            flat = {k: saved[k] for k in saved.files}
        with open(os.path.join(path, ROWS)) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointMismatchError(f"reward_model.init_from: cannot read {path}: {e}") from e
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    want = {_key(p): tuple(x.shape) for p, x in leaves}
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if want != got:
        diff = sorted(
            f"{k}: export has {got.get(k)}, this config needs {want.get(k)}"
            for k in set(want) | set(got)
            if want.get(k) != got.get(k)
        )
        raise CheckpointMismatchError(
            f"reward_model.init_from: the model in {path} is not this config's:\n  "
            + "\n  ".join(diff)
        )
    params = jax.tree_util.tree_unflatten(
        treedef, [flat[_key(p)].astype(x.dtype) for p, x in leaves]
    )
    return params, rows
