"""Sharding on 8 simulated CPU devices: layouts follow the rules; results do not change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vcppo_jax import models, sampling, sharding
from vcppo_jax.models import ModelConfig

pytestmark = pytest.mark.multidevice(8)

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    qkv_bias=True,
)


def test_mesh_shapes():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.mesh_shape({"data": -1}, 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert sharding.mesh_shape({"data": -1, "fsdp": 16, "tensor": 4}, 256)["data"] == 4
    with pytest.raises(sharding.ShardingError, match="needs 12 devices; 8 are available"):
        sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
    with pytest.raises(sharding.ShardingError, match="do not divide the 8 devices"):
        sharding.make_mesh({"data": -1, "fsdp": 3})
    with pytest.raises(sharding.ShardingError, match="at most one mesh axis may be -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1})


def test_parameters_laid_out_as_rules_say():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params, _ = sharding.init_sharded(CONFIG, jax.random.key(0), mesh)
    layer = params["decoder"]["layers_0"]
    assert params["decoder"]["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert layer["attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert layer["attn"]["q_proj"]["bias"].sharding.spec == P("tensor", None)
    assert layer["attn"]["o_proj"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert layer["input_norm"]["scale"].sharding.spec == P("fsdp")
    assert params["lm_head"].sharding.spec == P("fsdp", "tensor")
    # Really split: each device holds a quarter of the embedding (tensor x fsdp).
    emb = params["decoder"]["embed"]["embedding"]
    assert {s.data.shape for s in emb.addressable_shards} == {(32, 16)}


def test_sharded_forward_and_sampling_equal_unsharded():
    params = models.init_params(CONFIG, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(8, 24)))
    want = models.forward(CONFIG, params, tokens)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = sharding.shard_params(params, CONFIG, mesh)
    batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
    got = models.forward(CONFIG, sharded, batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    sp = sampling.SamplingParams(max_new_tokens=12, temperature=0.0)
    lengths = np.array([3, 5, 7, 9, 2, 4, 6, 8])
    a = sampling.generate(CONFIG, params, np.asarray(tokens), lengths, sp, jax.random.key(0))
    b = sampling.generate(CONFIG, sharded, np.asarray(tokens), lengths, sp, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(a.response_tokens), np.asarray(b.response_tokens))


def test_indivisible_dimension_is_named():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    with pytest.raises(sharding.ShardingError, match=r"kv_heads|k_proj.*not divisible"):
        sharding.init_sharded(CONFIG, jax.random.key(0), mesh)
