"""The reward-model export: every leaf back exactly (bfloat16 too), refused for another model,
other settings or a damaged file, by name."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_sft_export import CFG as SFT_CFG
from vcppo_jax import models, rm_export
from vcppo_jax.checkpoint import CheckpointMismatchError

CFG = dataclasses.replace(SFT_CFG, value_inputs="hidden+likelihood")  # With an LM head.
FP = {"seed": 0, "reward_model.steps": 200, "model.value_inputs": "hidden+likelihood"}
ROWS = [{"step": 0, "stage": "reward_model", "time": 1.0, "rm/loss": 0.5}]


def value_params(config, key=0):
    params = jax.tree.map(np.asarray, models.init_params(config, jax.random.key(key), "value"))
    # Non-zero head and weight, and one bfloat16 leaf, so that a lost or rounded leaf shows.
    params["value_head"]["kernel"] = np.full_like(params["value_head"]["kernel"], 0.3)
    params["likelihood_weight"] = np.asarray(0.7, np.float32)
    params["lm_head"] = np.asarray(jnp.asarray(params["lm_head"], jnp.bfloat16))
    return params


def test_round_trip_is_exact(tmp_path):
    params = value_params(CFG)
    path = rm_export.export(str(tmp_path / "run"), params, FP, ROWS)
    assert path == str(tmp_path / "run" / "reward_model_export")
    assert not os.path.exists(path + ".tmp")
    assert rm_export.resolve(str(tmp_path / "run"), FP) == path  # The run's workdir names it.
    assert rm_export.resolve(path, FP) == path
    loaded, rows = rm_export.load(path, params)
    assert rows == ROWS
    flat = lambda t: dict(jax.tree_util.tree_leaves_with_path(t))
    assert flat(loaded).keys() == flat(params).keys()
    for k, v in flat(params).items():
        assert flat(loaded)[k].dtype == v.dtype, k
        np.testing.assert_array_equal(
            np.asarray(flat(loaded)[k], np.float32), np.asarray(v, np.float32)
        )


def test_another_model_other_settings_or_damage_are_refused(tmp_path):
    params = value_params(CFG)
    path = rm_export.export(str(tmp_path / "run"), params, FP, ROWS)
    # A value model without the likelihood input has no LM head or weight.
    plain = {k: v for k, v in params.items() if k not in ("lm_head", "likelihood_weight")}
    with pytest.raises(CheckpointMismatchError, match="lm_head: export has"):
        rm_export.load(path, plain)
    wider = dict(params, value_head=dict(params["value_head"], kernel=np.zeros((17, 1))))
    with pytest.raises(CheckpointMismatchError, match=r"value_head/kernel: export has \(16, 1\)"):
        rm_export.load(path, wider)
    with pytest.raises(CheckpointMismatchError, match="reward_model.steps: checkpoint has 200"):
        rm_export.resolve(path, dict(FP, **{"reward_model.steps": 600}))
    with pytest.raises(FileNotFoundError, match="reward_model.init_from="):
        rm_export.resolve(str(tmp_path), FP)
    with open(os.path.join(path, "params.npz"), "wb") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(CheckpointMismatchError, match="cannot read"):
        rm_export.load(path, params)
    with open(os.path.join(path, "fingerprint.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointMismatchError, match="is not valid JSON"):
        rm_export.resolve(path, FP)
