"""The SFT export: written whole, reused only under the settings and model it was trained with."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from vcppo_jax import models, sft_export
from vcppo_jax.checkpoint import CheckpointMismatchError
from vcppo_jax.models.config import ModelConfig

CFG = ModelConfig(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=64,
)
FP = {"seed": 0, "data.num_terms": 5, "sft.steps": 10}


@pytest.fixture
def exported(tmp_path):
    params = jax.tree.map(np.asarray, models.init_params(CFG, jax.random.key(0)))
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"tokenizer bytes")
    path = sft_export.export(str(tmp_path / "run"), CFG, params, FP, str(tok))
    return tmp_path, path, params


def test_export_round_trip(exported):
    tmp_path, path, params = exported
    assert path == str(tmp_path / "run" / "sft_policy")
    assert not os.path.exists(path + ".tmp")
    # The run's workdir and the export itself both name it.
    assert sft_export.resolve(str(tmp_path / "run"), FP) == path
    assert sft_export.resolve(path, FP) == path
    loaded = sft_export.load(path, CFG)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    mine = str(tmp_path / "other" / "tokenizer" / "spm.model")
    sft_export.adopt_tokenizer(path, mine, "src")
    assert open(mine, "rb").read() == b"tokenizer bytes"
    sft_export.adopt_tokenizer(path, mine, "src")  # Same bytes: accepted again.


def test_reuse_is_refused_under_other_settings(exported):
    tmp_path, path, _ = exported
    with pytest.raises(CheckpointMismatchError, match="data.num_terms: checkpoint has 5"):
        sft_export.resolve(path, {**FP, "data.num_terms": 7})
    with pytest.raises(FileNotFoundError, match="no finished SFT policy"):
        sft_export.resolve(str(tmp_path), FP)
    with pytest.raises(CheckpointMismatchError, match="is not this config's"):
        sft_export.load(path, dataclasses.replace(CFG, num_layers=2))
    mine = tmp_path / "mine.model"
    mine.write_bytes(b"another tokenizer")
    with pytest.raises(CheckpointMismatchError, match="differs from the tokenizer"):
        sft_export.adopt_tokenizer(path, str(mine), "src")
