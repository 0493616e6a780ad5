"""Checkpointer: a half-written checkpoint is never restored; config mismatches are refused."""

import hashlib
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
    ck.save(1, state, {"fingerprint": {}})
    hashed_in = []
    real = checkpoint.step_digests
    monkeypatch.setattr(
        checkpoint,
        "step_digests",
        lambda p: hashed_in.append(threading.current_thread().name) or real(p),
    )
    ck.save(2, state, {"fingerprint": {}})  # Step 1 is final now: hashed beside this save.
    ck.wait()
    assert os.path.exists(os.path.join(d, "digests", "1.json"))
    assert os.path.exists(os.path.join(d, "digests", "2.json"))
    assert hashed_in[0] != threading.main_thread().name  # Step 1: in the background thread.

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "step_digests", full)
    ck.save(3, state, {"fingerprint": {}})
    ck.save(4, state, {"fingerprint": {}})  # Digests of 3 fail in the background ...
    with pytest.raises(CheckpointSaveError, match="No space left on device"):
        ck.wait()  # ... and are reported here.
    ck.close()
