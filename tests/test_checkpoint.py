"""Checkpointer: a half-written checkpoint is never restored; config mismatches are refused."""

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
