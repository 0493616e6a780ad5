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
