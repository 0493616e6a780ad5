"""An SFT policy exported for reuse: ``WORKDIR/sft_policy`` (HF format, tokenizer, settings).

A run's SFT stage ends by writing its policy here; another run starts from it with
``sft.init_from`` (the study trains one SFT policy per seed and starts every method from it).
The export holds ``fingerprint.json``, the settings the policy was trained under, and reuse is
refused with the differing fields when they are not this run's.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
from typing import Any

from vcppo_jax.checkpoint import CheckpointMismatchError, fingerprint_diff
from vcppo_jax.models import ModelConfig, hf

EXPORT_DIR = "sft_policy"
FINGERPRINT = "fingerprint.json"
TOKENIZER = "spm.model"


def export(
    workdir: str, model_config: ModelConfig, params, fingerprint: dict[str, Any], tokenizer: str
) -> str:
    """Writes ``workdir/sft_policy`` whole (through a temporary folder) and returns its path.
    ``params`` are host arrays; ``tokenizer`` a SentencePiece file to copy, or '' for none."""
    path = os.path.join(workdir, EXPORT_DIR)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_checkpoint(tmp, model_config, params)
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(tmp, TOKENIZER))
    with open(os.path.join(tmp, FINGERPRINT), "w") as f:
        json.dump(fingerprint, f, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def resolve(
    src: str,
    fingerprint: dict[str, Any],
    *,
    field: str = "sft.init_from",
    export_dir: str = EXPORT_DIR,
    what: str = "SFT policy",
    stage: str = "SFT",
) -> str:
    """``sft.init_from`` (an export, or the workdir of the run that wrote one) -> the export's
    path, after checking it was trained under ``fingerprint``'s settings. ``field``,
    ``export_dir``, ``what`` and ``stage`` (the stage that writes it) name another kind of
    export (rm_export.py)."""
    exported = os.path.isfile(os.path.join(src, FINGERPRINT))
    path = src if exported else os.path.join(src, export_dir)
    fp_file = os.path.join(path, FINGERPRINT)
    if not os.path.isfile(fp_file):
        raise FileNotFoundError(
            f"{field}={src!r}: no finished {what} there (expected {fp_file}, "
            f"written when a run's {stage} stage ends)"
        )
    try:
        with open(fp_file) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointMismatchError(f"{field}={src!r}: {fp_file} is not valid JSON ({e})") from e
    diff = fingerprint_diff(saved, fingerprint)
    if diff:
        raise CheckpointMismatchError(
            f"{field}={src!r} was trained under different settings:\n  " + "\n  ".join(diff)
        )
    return path


def adopt_tokenizer(path: str, mine: str, src: str) -> None:
    """Copies the export's tokenizer to ``mine`` (this run's), or checks they are the same."""
    theirs = os.path.join(path, TOKENIZER)
    if not os.path.exists(mine):
        os.makedirs(os.path.dirname(mine), exist_ok=True)
        shutil.copyfile(theirs, mine + ".tmp")
        os.replace(mine + ".tmp", mine)
    elif not filecmp.cmp(mine, theirs, shallow=False):
        raise CheckpointMismatchError(
            f"{mine} differs from the tokenizer of sft.init_from={src!r}; use a new --workdir"
        )


def load(path: str, model_config: ModelConfig):
    """The exported policy's parameters (host arrays), refused unless its model is
    ``model_config`` (up to the position limit, which the export does not fix)."""
    saved, params = hf.load_checkpoint(
        path,
        param_dtype=model_config.param_dtype,
        dtype=model_config.dtype,
        remat=model_config.remat,
        value_inputs=model_config.value_inputs,  # A value model's setting; no policy weight.
        vocab_limit=model_config.vocab_limit,  # The run's setting; the export holds none.
    )
    if dataclasses.replace(saved, max_position_embeddings=0) != dataclasses.replace(
        model_config, max_position_embeddings=0
    ):
        raise CheckpointMismatchError(
            f"sft.init_from: the model in {path} ({saved}) is not this config's ({model_config})"
        )
    return params
