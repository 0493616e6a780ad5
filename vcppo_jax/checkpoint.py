"""Orbax checkpoints of a whole experiment: model states, optimiser states, progress and RNG.

A checkpoint holds ``state`` (``train_state.ModelStates``: policy, SFT policy, critic, reward
model and their optimiser states, the reference policy) and ``meta`` (JSON: stage, step within
the stage, data position, and the config fingerprint). No RNG state is saved: every step's keys
are a function of (seed, stage, step). Saves are asynchronous; Orbax only ever lists
checkpoints whose write has finished, so a half-written one is never restored: the previous
complete one is. Restoring under a config whose fingerprint differs is refused with the list
of differing fields.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint written under a config whose fingerprint differs from the current one."""

    pass


# Settings an SFT policy depends on beyond the checkpoint fingerprint.
SFT_KEYS = (
    "sft.steps",
    "sft.min_terms",
    "sft.batch_size",
    "sft.learning_rate",
    "data.direct_fraction",
    "actor.grad_clip",
    "model.dtype",
)


def fingerprint(config, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Config fields a checkpoint's contents depend on (shapes and the data stream)."""
    keys = [
        "seed",
        "model.hidden_size",
        "model.num_layers",
        "model.num_heads",
        "model.num_kv_heads",
        "model.intermediate_size",
        "model.rope_theta",
        "model.param_dtype",
        "model.hf_path",
        "data.task",
        "data.num_terms",
        "data.digits",
        "data.labels",
        "data.carry_every",
        "data.tokenizer_vocab_size",
        "data.train_files",
        *extra,
    ]
    out = {}
    for k in keys:
        node = config
        for part in k.split("."):
            node = node[part]
        out[k] = node
    files = [p for p in str(config.data.train_files).split(",") if p]
    if config.data.task == "math" and files:
        # The prompts themselves, not only their paths: an edited file is another data stream.
        from vcppo_jax.data.math_prompts import MathPrompts

        out["data.train_files_sha256"] = {p: file_digest(p) for p in files}
        out["data.tfds_version"] = str(MathPrompts.VERSION)
    return out


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (hex), or "missing" when there is no such file."""
    if not os.path.isfile(path):
        return "missing"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Content fields (file hashes) that checkpoints written before they existed do not hold: such
# a checkpoint is not compared on them (its data cannot be checked after the fact).
CONTENT_FIELDS = ("data.train_files_sha256", "data.tfds_version")


# Fields added to the fingerprint after checkpoints had been written without them: such a
# checkpoint was written with the field at this value.
ADDED_FIELDS: dict[str, Any] = {
    "data.labels": False,
    "data.carry_every": 0,
    "sft.min_terms": 0,
    "model.rope_theta": 10000.0,
}


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per fingerprint field whose saved and current values differ (empty: they agree).
    A field of ``ADDED_FIELDS`` that an older checkpoint lacks counts as saved at its listed
    value."""
    keys = sorted(k for k in set(saved) | set(current) if k in saved or k not in CONTENT_FIELDS)
    saved = {**{k: v for k, v in ADDED_FIELDS.items() if k in current}, **saved}
    return [
        f"{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


class Checkpointer:
    """Orbax checkpoints in ``directory``: items ``state`` and ``meta`` per step, the latest
    ``max_to_keep`` kept, saved asynchronously unless ``async_save`` is False."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        """The step of the latest finished checkpoint, or None if there is none."""
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any], *, force: bool = False) -> None:
        """Starts saving ``state`` and JSON ``meta`` as checkpoint ``step``; unserialisable ``meta``
        raises here. ``force`` saves even where the manager's save policy would skip the step."""
        json.dumps(meta)  # Fail here, not in a background thread, on unserialisable meta.
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def restore(self, abstract_state, fingerprint: dict[str, Any], step: int | None = None):
        """-> (state, meta) of the latest (or given) finished checkpoint, or None if none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        diff = fingerprint_diff(meta.get("fingerprint", {}), fingerprint)
        if diff:
            raise CheckpointMismatchError(
                f"the checkpoint at {self.directory} (step {step}) was written under a different "
                "config:\n  " + "\n  ".join(diff) + "\nUse a new --workdir, or the old config."
            )
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return restored["state"], meta

    def wait(self) -> None:
        """Blocks until every save in progress has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for saves in progress to finish, then closes the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
