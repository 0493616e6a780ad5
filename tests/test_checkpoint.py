"""Checkpointer: a half-written checkpoint is never restored; config mismatches are refused."""

import gc
import hashlib
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from vcppo_jax.checkpoint import Checkpointer, CheckpointMismatchError


def test_half_written_checkpoint_is_skipped_and_mismatch_refused(tmp_path):
    d = str(tmp_path / "ckpt")
    ck = Checkpointer(d)
    state = {"w": jnp.arange(4.0), "step": jnp.array(1)}
    ck.save(1, state, {"stage": "a", "fingerprint": {"x": 1}})
    ck.save(
        2, {"w": jnp.arange(4.0) * 2, "step": jnp.array(2)}, {"stage": "b", "fingerprint": {"x": 1}}
    )
    ck.close()
    # Simulate a crash while step 3 was being written: Orbax's temporary directory is left.
    shutil.copytree(os.path.join(d, "2"), os.path.join(d, "3.orbax-checkpoint-tmp"))
    ck = Checkpointer(d)
    assert ck.latest_step() == 2
    restored, meta = ck.restore(state, {"x": 1})
    np.testing.assert_array_equal(np.asarray(restored["w"]), [0, 2, 4, 6])
    assert meta["stage"] == "b"
    with pytest.raises(CheckpointMismatchError, match="x: checkpoint has 1, config has 2"):
        ck.restore(state, {"x": 2})
    ck.close()
    assert Checkpointer(str(tmp_path / "empty")).restore(state, {"x": 1}) is None


def test_data_fingerprint_covers_the_prompt_files_content(tmp_path):
    from configs import vcppo
    from vcppo_jax.checkpoint import fingerprint, fingerprint_diff

    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    c = vcppo.get_config("smoke")
    c.data.task = "math"
    c.data.train_files = str(data)
    before = fingerprint(c)
    assert (
        before["data.train_files_sha256"][str(data)]
        == hashlib.sha256(data.read_bytes()).hexdigest()
    )
    assert fingerprint_diff(before, fingerprint(c)) == []
    data.write_text('{"problem": "1+2", "answer": "3"}\n')  # Same path, other prompts.
    (line,) = fingerprint_diff(before, fingerprint(c))
    assert line.startswith("data.train_files_sha256: checkpoint has {")
    assert before["data.train_files_sha256"][str(data)] in line
    assert hashlib.sha256(data.read_bytes()).hexdigest() in line
    # A checkpoint written before file hashes were recorded is not refused for lacking them.
    old = {
        k: v for k, v in before.items() if k not in ("data.train_files_sha256", "data.tfds_version")
    }
    assert fingerprint_diff(old, fingerprint(c)) == []


def test_a_save_the_disk_cannot_hold_is_refused_and_the_last_checkpoint_kept(tmp_path, monkeypatch):
    from collections import namedtuple

    from vcppo_jax import checkpoint
    from vcppo_jax.checkpoint import CheckpointSaveError

    d = str(tmp_path / "ckpt")
    state = {"w": jnp.arange(1000.0)}
    ck = Checkpointer(d)
    ck.save(1, state, {"fingerprint": {}})
    ck.wait()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(CheckpointSaveError) as info:
        ck.save(2, {"w": state["w"] * 2}, {"fingerprint": {}})
    msg = str(info.value)
    assert "\n" not in msg
    assert f"saving checkpoint step 2 in {d} failed (No space left on device: 0.0 MiB free" in msg
    assert "checkpoint step 1 is intact" in msg
    ck.close()
    monkeypatch.undo()
    ck = Checkpointer(d)
    assert ck.latest_step() == 1
    restored, _ = ck.restore(state, {})
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(1000.0))
    ck.close()


def test_a_save_that_fails_in_the_background_is_reported_in_one_line(tmp_path, monkeypatch):
    """A write error inside the asynchronous save (as TensorStore reports a full disk)
    surfaces at the next save or wait as ``CheckpointSaveError`` naming the step and cause."""
    import errno

    from vcppo_jax.checkpoint import CheckpointSaveError

    d = str(tmp_path / "ckpt")
    state = {"w": jnp.arange(4.0)}
    ck = Checkpointer(d)
    ck.save(1, state, {"fingerprint": {}})
    ck.wait()

    def fail():
        raise ValueError(
            'OUT_OF_RANGE: Error writing "w/0" in OCDBT database: Failed to write 36486 bytes '
            f"to file 9: No space left on device [os_error_code='{errno.ENOSPC}']"
        )

    ck.save(2, state, {"fingerprint": {}})
    monkeypatch.setattr(ck.manager, "wait_until_finished", fail)
    with pytest.raises(CheckpointSaveError, match=r"step 2 .* failed \(No space left on device\)"):
        ck.wait()
    ck.close()  # After a reported failure, closing neither raises nor waits again.


def test_digests_are_written_in_the_background_and_their_failure_reported(tmp_path, monkeypatch):
    import errno
    import threading

    from vcppo_jax import checkpoint
    from vcppo_jax.checkpoint import CheckpointSaveError

    d = str(tmp_path / "ckpt")
    state = {"w": jnp.arange(4.0)}
    ck = Checkpointer(d)
    hashed_in = []
    real = checkpoint.step_digests
    monkeypatch.setattr(
        checkpoint,
        "step_digests",
        lambda p: hashed_in.append(threading.current_thread().name) or real(p),
    )
    ck.save(1, state, {"fingerprint": {}})
    ck.save(2, state, {"fingerprint": {}})
    ck.wait()
    assert os.path.exists(os.path.join(d, "digests", "1.json"))
    assert os.path.exists(os.path.join(d, "digests", "2.json"))
    assert len(hashed_in) == 2 and threading.main_thread().name not in hashed_in

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "step_digests", full)
    ck.save(3, state, {"fingerprint": {}})  # Its digests fail in the background ...
    with pytest.raises(CheckpointSaveError) as info:
        ck.save(4, state, {"fingerprint": {}})  # ... and are reported by the next save.
    assert str(info.value) == (
        f"recording the digests of checkpoint step 3 in {d} failed (No space left on device); "
        "the checkpoint itself was written, and a rerun resumes from it, unverified, once the "
        "cause is fixed"
    )
    ck.close()
    assert Checkpointer(d).latest_step() == 3


def test_digests_are_recorded_as_soon_as_the_save_finishes(tmp_path):
    """A run killed after a save has finished (no later save, wait or close) still leaves the
    digests of that newest checkpoint, so damage to its bytes is found on resume."""
    import time

    from vcppo_jax.checkpoint import step_digests

    d = str(tmp_path / "ckpt")
    ck = Checkpointer(d)
    ck.save(1, {"w": jnp.arange(4.0)}, {"fingerprint": {}})
    ck.manager.wait_until_finished()  # Orbax's own wait: the Checkpointer is not told.
    record = os.path.join(d, "digests", "1.json")
    deadline = time.monotonic() + 60
    while not os.path.exists(record) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(record)
    with open(record) as f:
        assert json.load(f) == step_digests(os.path.join(d, "1"))
    ck.close()


def test_an_undigested_checkpoint_is_restored_with_a_warning_and_never_digested_later(
    tmp_path, capfd
):
    """A checkpoint whose run stopped before its digests were written is restored (refusing it
    would lose the work) with a warning; the resumed run does not record its bytes as good."""
    d = str(tmp_path / "ckpt")
    state = {"w": jnp.arange(4.0)}
    ck = Checkpointer(d)
    ck.save(1, state, {"fingerprint": {}})
    ck.save(2, {"w": state["w"] * 2}, {"fingerprint": {}})
    ck.close()
    os.remove(os.path.join(d, "digests", "2.json"))  # Killed before step 2's were written.
    capfd.readouterr()
    ck = Checkpointer(d)
    restored, _ = ck.restore(state, {})
    assert ck.restored_step == 2
    np.testing.assert_array_equal(np.asarray(restored["w"]), [0, 2, 4, 6])
    err = capfd.readouterr().err
    assert (
        f"no digests recorded for checkpoint step 2 in {d} (the run stopped before they were "
        "written); restoring it unverified" in err
    )
    assert "damaged" not in err
    ck.save(3, restored, {"fingerprint": {}})
    ck.close()
    assert sorted(os.listdir(os.path.join(d, "digests"))) == ["1.json", "3.json"]


# Orbax leaves a read of the refused array un-awaited; it is collected at the test's end.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_intact_checkpoint_of_another_shape_is_refused_as_a_mismatch_not_damage(
    tmp_path, capfd, monkeypatch
):
    """Orbax cannot restore a saved state into a differently shaped one (an array added, or of
    another length): that is another config's checkpoint, named array by array, not damage,
    and older checkpoints (shaped alike) are not tried."""
    from vcppo_jax.checkpoint import CheckpointDamagedError

    d = str(tmp_path / "ckpt")
    saved = {"critic": {"w": jnp.arange(4.0), "position_offset": jnp.zeros(32)}}
    ck = Checkpointer(d)
    ck.save(1, saved, {"fingerprint": {}})
    ck.save(2, saved, {"fingerprint": {}})
    ck.close()
    capfd.readouterr()
    ck = Checkpointer(d)
    without = {"critic": {"w": jnp.arange(4.0)}}
    longer = {"critic": {"w": jnp.arange(4.0), "position_offset": jnp.zeros(24)}}
    with pytest.raises(CheckpointMismatchError) as info:
        ck.restore(without, {})
    assert str(info.value) == (
        f"checkpoint step 2 in {d} is intact (its files match their digests) but holds a "
        "differently shaped state than this config builds (a setting that shapes the models "
        "differs from the one it was written under):\n"
        "  critic.position_offset: checkpoint has shape (32,), config has no such array\n"
        "  (Orbax: User-provided restore item and on-disk value metadata tree structures do not "
        "match)\n"
        "Use a new --workdir, or the config the checkpoint was written under."
    )
    with pytest.raises(CheckpointMismatchError) as info:
        ck.restore(longer, {})
    assert "critic.position_offset: checkpoint has shape (32,), config has shape (24,)\n" in str(
        info.value
    )
    assert "(Orbax: Requested shape: (24,) is not compatible with the stored shape: (32,))" in str(
        info.value
    )
    assert "damaged" not in capfd.readouterr().err
    # Without digests (a run stopped before writing them) the saved layout still tells.
    os.remove(os.path.join(d, "digests", "2.json"))
    with pytest.raises(CheckpointMismatchError, match=f"checkpoint step 2 in {d} holds a diff"):
        ck.restore(without, {})
    assert "damaged" not in capfd.readouterr().err
    restored, _ = ck.restore(saved, {})  # The state it was written for restores.
    np.testing.assert_array_equal(np.asarray(restored["critic"]["w"]), np.arange(4.0))
    # Any other failure to restore verified bytes is raised as it is: not damage either.
    real = ck.manager.restore

    def out_of_memory(step, args):
        if "state" in args.keys():
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return real(step, args=args)

    monkeypatch.setattr(ck.manager, "restore", out_of_memory)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED") as info:
        ck.restore(saved, {}, step=1)
    assert "its files match their digests, so this is not damage" in info.value.__notes__[0]
    assert "damaged" not in capfd.readouterr().err
    # Unverified bytes Orbax cannot read are still damage, and the one before is tried.
    with pytest.raises(CheckpointDamagedError):
        ck.restore(saved, {}, step=2)
    assert f"checkpoint step 2 in {d} is damaged (RuntimeError: RESOURCE_EXHAUSTED" in (
        capfd.readouterr().err
    )
    ck.close()
    gc.collect()


def test_run_fingerprint_covers_the_critic_offset_table():
    """critic.init_offset_profile="linear" adds a trainable table of rollout.max_new_tokens
    entries to the critic: both shape the saved state then, the length only then."""
    from configs import vcppo
    from vcppo_jax.checkpoint import RM_KEYS, RUN_KEYS, fingerprint, fingerprint_diff
    from vcppo_jax.train_state import with_critic_offset

    c = vcppo.get_config("smoke")
    head = {"value_head": {"bias": jnp.zeros(())}}
    n = c.rollout.max_new_tokens
    assert with_critic_offset(head, -1.0, "linear", n)["position_offset"].shape == (n,)
    assert "position_offset" not in with_critic_offset(head, -1.0, "constant", n)
    constant = fingerprint(c, RUN_KEYS)
    assert constant["critic.init_offset_profile"] == "constant"
    assert "rollout.max_new_tokens" not in constant
    c.rollout.max_new_tokens = n + 8  # Shapes nothing saved: a resume may change it.
    assert fingerprint_diff(constant, fingerprint(c, RUN_KEYS)) == []
    c.rollout.max_new_tokens = n
    c.critic.init_offset_profile = "linear"
    linear = fingerprint(c, RUN_KEYS)
    assert linear["rollout.max_new_tokens"] == n
    assert fingerprint_diff(constant, linear) == [
        "critic.init_offset_profile: checkpoint has 'constant', config has 'linear'"
    ]
    c.rollout.max_new_tokens = n + 8
    assert fingerprint_diff(linear, fingerprint(c, RUN_KEYS)) == [
        f"rollout.max_new_tokens: checkpoint has {n}, config has {n + 8}"
    ]
    # A checkpoint written before the fields were recorded may hold either profile: it is not
    # compared on them (restore compares its saved shapes instead).
    new_fields = ("critic.init_offset_profile", "rollout.max_new_tokens")
    old = {k: v for k, v in linear.items() if k not in new_fields}
    assert fingerprint_diff(old, linear) == []
    assert fingerprint_diff(old, constant) == []
    # The reward model has no critic offset: its exports are shared across profiles.
    assert "critic.init_offset_profile" not in RM_KEYS
    assert fingerprint(c, RM_KEYS) == fingerprint(vcppo.get_config("smoke"), RM_KEYS)
