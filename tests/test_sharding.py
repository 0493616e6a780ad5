"""Sharding on 8 simulated CPU devices: layouts follow the rules; results do not change."""

import flax.linen as nn
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


def test_model_traced_under_its_rules_equals_unsharded_and_pins_the_residual_stream():
    """As the runner traces its steps: under the mesh and ``nn.logical_axis_rules``. The
    embeddings and each layer's output are constrained to rows over data x fsdp, width
    replicated, in passes over many tokens; a decode step is left to the partitioner."""
    params = models.init_params(CONFIG, jax.random.key(1))
    critic = models.init_params(CONFIG, jax.random.key(2), "value")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(8, 24)))
    lengths = np.array([3, 5, 7, 9, 2, 4, 6, 8])
    sp = sampling.SamplingParams(max_new_tokens=6, temperature=0.0)
    want = models.forward(CONFIG, params, tokens), models.values(CONFIG, critic, tokens)
    want_sample = sampling.generate(
        CONFIG, params, np.asarray(tokens), lengths, sp, jax.random.key(0)
    )
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = sharding.shard_params(params, CONFIG, mesh)
    sharded_critic, _ = sharding.shard_params(critic, CONFIG, mesh, head="value")
    batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
    residual = '[{"data", "fsdp"}, {}, {}]> : tensor<8x24x32x'
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        # Parameters made here (as the runner makes a fresh head) are plain host arrays.
        fresh = models.init_params(CONFIG, jax.random.key(1))
        leaves = zip(jax.tree.leaves(fresh), jax.tree.leaves(params), strict=True)
        assert all(np.array_equal(a, b) for a, b in leaves)
        got = models.forward(CONFIG, sharded, batch), models.values(CONFIG, sharded_critic, batch)
        # A fresh jit: Flax's rules are not in jit's cache key, so an earlier trace of
        # ``models.forward`` under this mesh without them would otherwise be reused.
        fresh_forward = jax.jit(models.forward.__wrapped__, static_argnums=0)
        text = fresh_forward.lower(CONFIG, sharded, batch).as_text()
        sample = sampling.generate(
            CONFIG, sharded, np.asarray(tokens), lengths, sp, jax.random.key(0)
        )
        state = sampling.prefill(
            CONFIG, sharded, batch, jnp.asarray(lengths), sp, jax.random.key(0)
        )
        decode = jax.jit(sampling.decode.__wrapped__, static_argnums=(0, 3))
        step = decode.lower(CONFIG, sharded, state, sp).as_text()
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_array_equal(sample.response_tokens, want_sample.response_tokens)
    assert text.count(residual) == CONFIG.num_layers + 1  # The embeddings, then each layer.
    assert '[{"tensor"}, {}]> : tensor<64x32x' in text  # The table, gathered over fsdp.
    assert "x1x32x" in step and "{}, {}]> : tensor<8x1x32x" not in step


def test_log_probs_gather_the_lm_head_once_and_size_chunks_per_device():
    """Under the rules, the chunked log-probs read the LM head gathered over fsdp once, not in
    every chunk's iteration (forward and backward), and a chunk's logits budget is counted
    on what one device holds (rows over data x fsdp, vocabulary over tensor)."""
    from benchmarks import gpu_compile

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params, _ = sharding.init_sharded(CONFIG, jax.random.key(0), mesh)
    tokens = jax.device_put(jnp.zeros((8, 129), jnp.int32), sharding.batch_sharding(mesh))
    loss = lambda p, t: jnp.sum(models.token_logprobs.__wrapped__(CONFIG, p, t, chunk_size=16))
    found = {}
    for name, rules in (("rules", sharding.DEFAULT_RULES), ("none", ())):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # A fresh trace for each.
            hlo = jax.jit(jax.grad(loss)).lower(params, tokens).compile().as_text()
        comps = gpu_compile.computations(hlo)
        loops = gpu_compile.while_loops(hlo)
        assert loops  # The chunks' loop.
        in_loops = [gpu_compile.collectives(comps, body) for _, body in loops]
        total = sum(b for _, b in gpu_compile.collectives(comps).values())
        found[name] = (in_loops, total)
    assert all("all-gather" not in c for c in found["rules"][0]), found["rules"][0]
    assert any("all-gather" in c for c in found["none"][0])  # What the rules avoid.
    assert found["rules"][1] < found["none"][1]
    assert models.logprobs.per_device(8, "batch") == 8  # No mesh: the whole.
    one_device = models.auto_chunk_size(2, 2**19)
    assert models.auto_chunk_size(8, 2**20) < one_device
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        assert models.logprobs.per_device(8, "batch") == 2
        assert models.logprobs.per_device(64, "vocab") == 32
        assert models.logprobs.per_device(6, "batch") == 3  # fsdp (2) does not divide 3.
        assert models.auto_chunk_size(8, 2**20) == one_device


def test_rule_axes_and_the_axes_that_divide():
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("embed", "tensor"), ("x", None))
    assert sharding.rule_axes("batch", rules) == ("data", "fsdp")
    assert sharding.rule_axes("embed", rules) == ("fsdp",)  # The first rule, as Flax reads it.
    assert sharding.rule_axes("x", rules) == () and sharding.rule_axes("unlisted", rules) == ()
    sizes = {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.dividing_axes(8, ("data", "fsdp"), sizes) == ("data", "fsdp")
    assert sharding.dividing_axes(6, ("data", "fsdp"), sizes) == ("data",)  # 3 rows left.
    assert sharding.dividing_axes(8, ("tensor", "fsdp"), sizes) == ("fsdp",)  # Size 1: none.


def test_indivisible_dimension_is_named():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    with pytest.raises(sharding.ShardingError, match=r"kv_heads|k_proj.*not divisible"):
        sharding.init_sharded(CONFIG, jax.random.key(0), mesh)
