"""Orbax checkpoints of a whole experiment: model states, optimiser states, progress and RNG.

A checkpoint holds ``state`` (``train_state.ModelStates``: policy, SFT policy, critic, reward
model and their optimiser states, the reference policy) and ``meta`` (JSON: stage, step within
the stage, data position, and the config fingerprint). No RNG state is saved: every step's keys
are a function of (seed, stage, step). Saves are asynchronous; Orbax only ever lists
checkpoints whose write has finished, so a half-written one is never restored: the previous
complete one is. As soon as a save has finished, a background thread records the SHA-256 of
each of its files (``digests/STEP.json``); a restore checks them, and a checkpoint whose bytes
differ is reported as damaged and the one before it tried. Restoring under a config whose
fingerprint differs is refused with the list of differing fields, and an intact checkpoint
whose saved state is shaped differently from the one this config builds is refused naming the
arrays that differ (never called damaged).
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
# which an exported SFT policy does not. critic.init_offset_profile="linear" adds a trainable
# per-token offset table to the critic, of rollout.max_new_tokens entries: ``fingerprint``
# then records rollout.max_new_tokens too (with the constant profile it shapes nothing saved,
# and a run may be resumed with another value).
RUN_KEYS = ("model.value_inputs", "critic.init_offset_profile")

# What a trained reward model depends on (rm_export.py): the SFT policy it starts from, the
# value models' inputs, and every reward_model.* field that shapes its training or its logged
# held-out report. Not the critic's offset: the reward model has none.
RM_KEYS = (
    *SFT_KEYS,
    "model.value_inputs",
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
    if out.get("critic.init_offset_profile") == "linear":  # The offset table's length.
        out["rollout.max_new_tokens"] = config.rollout.max_new_tokens
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


# Fields compared only where both the checkpoint and the config record them. The linear offset
# profile was in use before it joined the fingerprint, so a checkpoint without the field may
# hold either profile (and rollout.max_new_tokens is recorded only with the linear one); the
# saved state's own shapes tell them apart: restore refuses a differently shaped one by name.
LAYOUT_FIELDS = ("critic.init_offset_profile", "rollout.max_new_tokens")


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
    value; one of ``CONTENT_FIELDS`` it lacks, or of ``LAYOUT_FIELDS`` either side lacks, is
    not compared."""
    keys = sorted(
        k
        for k in set(saved) | set(current)
        if (k in saved or k not in CONTENT_FIELDS)
        and ((k in saved and k in current) or k not in LAYOUT_FIELDS)
    )
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

    def _write_digests(self, step: int) -> None:
        """Records the SHA-256 of every file of checkpoint ``step``, one this Checkpointer saved,
        unless it has a record already or Orbax does not list it (a step the save policy
        skipped); a listed checkpoint is finished, so its bytes are final. Drops the records of
        checkpoints no longer listed. A checkpoint written by an earlier run that stopped before
        recording its digests is never digested here: its bytes may have been damaged since."""
        if jax.process_index() != 0:
            return
        steps = set(self.manager.all_steps())
        folder = os.path.join(self.directory, DIGESTS_DIR)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # Records of checkpoints since deleted.
            if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) not in steps:
                os.remove(os.path.join(folder, name))
        path = self._digest_path(step)
        if step in steps and not os.path.exists(path):
            digests = step_digests(os.path.join(self.directory, str(step)))
            with open(path + ".tmp", "w") as f:
                json.dump(digests, f)
            os.replace(path + ".tmp", path)

    def _digest_when_saved(self, step: int) -> None:
        """The digest thread: waits for the save of ``step`` to finish, then digests it. What
        fails is raised in the main thread by the next ``_join_digests``."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # The save failed (the main thread's wait raises it too).
            self._digest_error = e
            return
        try:
            self._write_digests(step)
        except Exception as e:
            self._digest_error = _DigestError(step, e)

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
        A background thread digests the checkpoint's files as soon as its write has finished
        (hashing overlaps the next steps, and a run killed after that keeps the record); the
        next save, ``wait`` or ``close`` waits for it. A save, or its digests, that fails (now
        or in the background) raises ``CheckpointSaveError``."""
        json.dumps(meta)  # Fail here, not in a background thread, on unserialisable meta.
        self._finish()
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
        self._digester = threading.Thread(
            target=self._digest_when_saved,
            args=(step,),
            name=f"checkpoint-digests-{step}",
            daemon=True,
        )
        self._digester.start()

    def _finish(self) -> None:
        """Waits for the save in progress and for its digests, turning a failure of either into
        ``CheckpointSaveError``."""
        with self._reporting_failure():
            self.manager.wait_until_finished()
            self._join_digests()
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
        except _DigestError as error:
            self._failed = True
            raise CheckpointSaveError(
                f"recording the digests of checkpoint step {error.step} in {self.directory} "
                f"failed ({_reason(error.cause)}); the checkpoint itself was written, and a "
                "rerun resumes from it, unverified, once the cause is fixed"
            ) from error.cause
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
        it is tried: damaged bytes are never restored. One without recorded digests (its run
        stopped before writing them) is restored unverified, with a warning. One whose saved
        state is shaped differently from ``abstract_state`` is refused with
        ``CheckpointMismatchError`` naming the arrays that differ; so is one whose fingerprint
        differs from ``fingerprint``. Neither tries older checkpoints: they share the config."""
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        for s in steps:
            recorded = os.path.exists(self._digest_path(s))
            damaged = self.verify(s)
            if damaged is None:
                if not recorded:
                    print(
                        f"no digests recorded for checkpoint step {s} in {self.directory} (the "
                        "run stopped before they were written); restoring it unverified",
                        file=sys.stderr,
                        flush=True,
                    )
                try:
                    out = self._restore_step(s, abstract_state, fingerprint)
                    self.restored_step = s
                    return out
                except CheckpointMismatchError:
                    raise
                except Exception as e:
                    self._raise_if_not_damage(s, abstract_state, e, verified=recorded)
                    # Orbax could not read it: truncated or missing files.
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

    def _raise_if_not_damage(self, step: int, abstract_state, error: Exception, verified: bool):
        """Raises when Orbax's failure to restore checkpoint ``step`` is not damage: a saved state
        shaped differently from ``abstract_state`` (``CheckpointMismatchError`` naming the
        arrays that differ, or quoting Orbax), or, for a checkpoint whose files match their
        digests (``verified``), whatever Orbax raised."""
        differ = _layout_diff(self._saved_layout(step), abstract_state)
        said = [line.strip() for line in str(error).splitlines() if line.strip()]
        if differ or (verified and _LAYOUT_ERROR.search(str(error))):
            intact = " is intact (its files match their digests) but" if verified else ""
            lines = differ or said[1:9]
            orbax = said[0].split(". ")[0].rstrip(":")[:200] if said else type(error).__name__
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory}{intact} holds a differently shaped "
                "state than this config builds (a setting that shapes the models differs from "
                "the one it was written under):\n  "
                + "\n  ".join([*lines, f"(Orbax: {orbax})"])
                + "\nUse a new --workdir, or the config the checkpoint was written under."
            ) from error
        if verified:
            error.add_note(
                f"checkpoint step {step} in {self.directory}: its files match their digests, so "
                "this is not damage to them"
            )
            raise error

    def _saved_layout(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """Name -> shape of each array of checkpoint ``step``'s saved state, as its metadata
        says; None if that cannot be read."""
        try:
            tree = self.manager.item_metadata(step)["state"]
            tree = getattr(tree, "tree", tree)
            return {
                m.name: tuple(m.shape)
                for m in jax.tree.leaves(tree)
                if hasattr(m, "name") and getattr(m, "shape", None) is not None
            }
        except Exception:
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
        """Blocks until every save in progress has finished and been digested."""
        self._finish()

    def close(self) -> None:
        """Waits for saves in progress to finish and be digested, then closes the manager.
        After a failed save (already raised) it only closes."""
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


class _DigestError(Exception):
    """Recording the digests of checkpoint ``step`` failed with ``cause``."""

    def __init__(self, step: int, cause: Exception):
        super().__init__(step, cause)
        self.step, self.cause = step, cause


# Orbax's words for a restore target shaped unlike the saved state.
_LAYOUT_ERROR = re.compile(r"tree structures do not match|stored shape|Requested shape")


def _layout_diff(saved: dict[str, tuple[int, ...]] | None, abstract_state) -> list[str]:
    """One line per array that the saved layout (``_saved_layout``) and ``abstract_state``
    do not share, or share with another shape (at most 8, then a count); empty if they agree
    or the saved layout is unknown. Arrays are named as Orbax names them: keys joined by dots."""
    if saved is None:
        return []
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    want = {
        ".".join(str(_key_name(k)) for k in path): tuple(getattr(x, "shape", ()))
        for path, x in leaves
    }
    out = []
    for name in sorted(set(saved) | set(want)):
        ckpt = f"shape {saved[name]}" if name in saved else "no such array"
        config = f"shape {want[name]}" if name in want else "no such array"
        if ckpt != config:
            out.append(f"{name}: checkpoint has {ckpt}, config has {config}")
    if len(out) > 8:
        out = [*out[:8], f"... and {len(out) - 8} more"]
    return out


def _key_name(key) -> Any:
    """A pytree path entry's name: a dict key, an attribute or a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


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
