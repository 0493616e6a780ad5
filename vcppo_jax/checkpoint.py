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

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

DIGESTS_DIR = "digests"  # CHECKPOINT_DIR/digests/STEP.json: SHA-256 of each file of a step.


class CheckpointDamagedError(RuntimeError):
    """No checkpoint in the folder is intact."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the ones before it are intact."""


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
    "model.mask_unused_vocab",
)


# Settings a run's checkpoints depend on beyond the fingerprint (the value models' shapes),
# which an exported SFT policy does not.
RUN_KEYS = ("model.value_inputs",)

# What a trained reward model depends on (rm_export.py): the SFT policy it starts from, the
# value models' inputs, and every reward_model.* field that shapes its training or its logged
# held-out report.
RM_KEYS = (
    *SFT_KEYS,
    *RUN_KEYS,
    "reward_model.steps",
    "reward_model.batch_size",
    "reward_model.learning_rate",
    "reward_model.eval_every",
    "reward_model.eval_problems",
    "reward_model.min_terms",
    "reward_model.pairs",
    "reward_model.direct_fraction",
    "reward_model.loss_on",
    "reward_model.score",
    "reward_model.init",
    "reward.correct",  # The outcome targets, and the held-out midpoint between them.
    "reward.incorrect",
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
    "model.value_inputs": "hidden",
    "reward.correct": 1.0,
    "reward.incorrect": -1.0,
    "model.mask_unused_vocab": False,
    "reward_model.direct_fraction": None,
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
        self.restored_step: int | None = None  # The step the last restore() returned.
        self._pending: int | None = None  # The step being saved in the background.
        self._failed = False  # A save failed (and was reported): close() only tidies up.
        self._digester: threading.Thread | None = None  # Digests being written.
        self._digest_error: Exception | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        """The step of the latest finished checkpoint, or None if there is none."""
        return self.manager.latest_step()

    def _digest_path(self, step: int) -> str:
        return os.path.join(self.directory, DIGESTS_DIR, f"{step}.json")

    def _write_digests(self, steps: set[int]) -> None:
        """Records the SHA-256 of every file of each finished checkpoint in ``steps`` that has
        no record yet (a checkpoint is finished once Orbax lists it, so its bytes are final),
        and drops the records of checkpoints no longer listed."""
        if jax.process_index() != 0:
            return
        folder = os.path.join(self.directory, DIGESTS_DIR)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # Records of checkpoints since deleted.
            if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) not in steps:
                os.remove(os.path.join(folder, name))
        for step in steps:
            path = self._digest_path(step)
            if not os.path.exists(path):
                digests = step_digests(os.path.join(self.directory, str(step)))
                with open(path + ".tmp", "w") as f:
                    json.dump(digests, f)
                os.replace(path + ".tmp", path)

    def _digest_in_background(self, steps: set[int]) -> None:
        try:
            self._write_digests(steps)
        except Exception as e:  # Raised in the main thread by the next _join_digests.
            self._digest_error = e

    def _join_digests(self) -> None:
        """Waits for the digests being computed in the background; raises what they raised."""
        if self._digester is not None:
            self._digester.join()
            self._digester = None
        if self._digest_error is not None:
            error, self._digest_error = self._digest_error, None
            raise error

    def verify(self, step: int) -> str | None:
        """None if checkpoint ``step``'s files match their recorded digests (or none were
        recorded), else the first damaged or missing file, relative to the step's folder."""
        path = self._digest_path(step)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                want = json.load(f)
        except (OSError, json.JSONDecodeError):
            return os.path.relpath(path, self.directory)
        got = step_digests(os.path.join(self.directory, str(step)))
        for name in sorted(want):
            if got.get(name) != want[name]:
                return name + ("" if name in got else " (missing)")
        return None

    def save(self, step: int, state, meta: dict[str, Any], *, force: bool = False) -> None:
        """Starts saving ``state`` and JSON ``meta`` as checkpoint ``step``; unserialisable ``meta``
        raises here. ``force`` saves even where the manager's save policy would skip the step.
        The previous save's files are digested in a background thread (they are final by
        then; the next save, ``wait`` or ``close`` waits for it). A save that
        fails (now or in the background) raises ``CheckpointSaveError``."""
        json.dumps(meta)  # Fail here, not in a background thread, on unserialisable meta.
        self._finish(background=True)
        self._pending = step
        self._check_space(state)
        with self._reporting_failure():
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )

    def _finish(self, background: bool = False) -> None:
        """Waits for the save in progress and digests it (in a background thread when
        ``background``: hashing a large checkpoint then overlaps the next steps), turning a
        failure into ``CheckpointSaveError``."""
        with self._reporting_failure():
            self.manager.wait_until_finished()
            self._join_digests()
            steps = set(self.manager.all_steps())
            if background:
                self._digester = threading.Thread(
                    target=self._digest_in_background, args=(steps,), daemon=True
                )
                self._digester.start()
            else:
                self._write_digests(steps)
        self._pending = None

    def _check_space(self, state) -> None:
        """Refuses (``CheckpointSaveError``) to start a save the disk cannot hold: a whole new
        checkpoint is written before the oldest is deleted. Its size is the newest checkpoint's
        on disk, or the arrays' bytes when there is none yet."""
        steps = self.manager.all_steps()
        if steps:
            folder = os.path.join(self.directory, str(max(steps)))
            need = sum(
                os.path.getsize(os.path.join(root, f))
                for root, _, files in os.walk(folder)
                for f in files
            )
        else:
            need = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            self._failed = True
            raise CheckpointSaveError(
                self._failure_message(
                    f"{os.strerror(errno.ENOSPC)}: {free / 2**20:.1f} MiB free, "
                    f"~{need / 2**20:.1f} MiB needed"
                )
            )

    @contextlib.contextmanager
    def _reporting_failure(self):
        try:
            yield
        except Exception as error:
            self._failed = True
            raise CheckpointSaveError(self._failure_message(_reason(error))) from error

    def _failure_message(self, reason: str) -> str:
        intact = [s for s in self.manager.all_steps() if s != self._pending]
        keep = (
            f"checkpoint step {max(intact)} is intact and a rerun resumes from it"
            if intact
            else "there is no earlier checkpoint: a rerun starts afresh"
        )
        return (
            f"saving checkpoint step {self._pending} in {self.directory} failed ({reason}); "
            f"{keep} once the cause is fixed"
        )

    def restore(self, abstract_state, fingerprint: dict[str, Any], step: int | None = None):
        """-> (state, meta) of the newest intact finished checkpoint (or of ``step``), or None
        if there is none. A checkpoint whose files differ from their recorded digests, or that
        Orbax cannot read, is reported in one line naming its step and file, and the one before
        it is tried: damaged bytes are never restored."""
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        for s in steps:
            damaged = self.verify(s)
            if damaged is None:
                try:
                    out = self._restore_step(s, abstract_state, fingerprint)
                    self.restored_step = s
                    return out
                except CheckpointMismatchError:
                    raise
                except Exception as e:  # Orbax could not read it: truncated or missing files.
                    damaged = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(
                f"checkpoint step {s} in {self.directory} is damaged ({damaged}); "
                + ("trying the one before" if s != steps[-1] else "no older one to try"),
                file=sys.stderr,
                flush=True,
            )
        if steps:
            raise CheckpointDamagedError(
                f"no intact checkpoint in {self.directory} (tried steps {steps}); move the "
                "folder aside to start afresh"
            )
        return None

    def _restore_step(self, step: int, abstract_state, fingerprint: dict[str, Any]):
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
        """Blocks until every save in progress has finished (and digests it)."""
        self._finish()

    def close(self) -> None:
        """Waits for saves in progress to finish, digests them, then closes the manager. After
        a failed save (already raised) it only closes."""
        try:
            if not self._failed:
                self._finish()
        finally:
            if self._digester is not None:  # After a failure: let it end, say nothing more.
                self._digester.join()
                self._digester = None
            try:
                self.manager.close()
            except Exception:
                if not self._failed:
                    raise


def _reason(error: Exception) -> str:
    """A failed save's cause in a few words: the OS error's text where there is one."""
    code = re.search(r"os_error_code='?(\d+)", str(error))  # TensorStore's OS errors.
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    if code:
        return os.strerror(int(code.group(1)))
    first = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def step_digests(step_dir: str) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under one checkpoint's folder."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, step_dir)] = file_digest(path)
    return out
