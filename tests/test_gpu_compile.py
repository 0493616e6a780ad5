"""benchmarks/gpu_compile.py: its reading of compiled HLO (checked on programs compiled for this
CPU, whose text has the same form), its targets, and its error without JAX's CUDA plugin."""

import importlib.util
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu_compile
from vcppo_jax import models, sampling


def decode_hlo(num_layers: int) -> str:
    config = models.ModelConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=num_layers,
        num_heads=4, num_kv_heads=2,
    )  # fmt: skip
    params = jax.eval_shape(lambda k: models.init_params(config, k), jax.random.key(0))
    sp = sampling.SamplingParams(max_new_tokens=8, temperature=0.0)
    state = jax.eval_shape(
        lambda p, x, n: sampling.prefill(config, p, x, n, sp, jax.random.key(0)),
        params,
        jax.ShapeDtypeStruct((2, 4), jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    )
    return sampling.decode.lower(config, params, state, sp).compile().as_text()


def test_the_decode_loop_is_found_and_each_layer_adds_the_same_kernels():
    counts = {}
    for layers in (2, 3, 4):
        hlo = decode_hlo(layers)
        comps = gpu_compile.computations(hlo)
        assert "ENTRY" in comps
        loops = gpu_compile.while_loops(hlo)
        assert len(loops) == 1
        condition, body = loops[0]
        assert condition in comps and body in comps
        counts[layers] = gpu_compile.kernels(comps[body])
    for part in ("attention", "mlp", "norm"):
        per_layer = counts[3][part] - counts[2][part]
        assert per_layer > 0 and counts[4][part] - counts[3][part] == per_layer, (part, counts)
    # Sampling the token and the loop's bookkeeping do not depend on the depth.
    assert counts[4]["sampling and loop"] == counts[2]["sampling and loop"] > 0


def test_instructions_that_launch_nothing_are_not_counted():
    lines = [
        '  %p = f32[4]{0} parameter(0), metadata={op_name="x"}',
        "  %b = f32[2,2]{1,0} bitcast(%p)",
        "  %g = f32[4]{0} get-tuple-element(%t), index=0",
        '  %f = f32[4]{0} fusion(%p), kind=kLoop, metadata={op_name="a/layers_0/mlp/mul"}',
        '  %s = f32[8]{0} all-gather-start(%f), metadata={op_name="a/layers_0/attn/x"}',
        '  %d = f32[8]{0} all-gather-done(%s), metadata={op_name="a/layers_0/attn/x"}',
        '  ROOT %k = f32[4]{0} custom-call(%f), metadata={op_name="a/layers_0/attn/dot"}',
    ]
    assert gpu_compile.kernels(lines) == {"mlp": 1, "attention": 2}  # An async pair is one.


def test_collectives_counted_with_their_bytes_and_loop_trips():
    """Lines in the forms XLA's GPU compiler writes (asynchronous pairs, combined collectives
    as tuples, layouts in braces), and the computations a program runs."""
    comps = {
        "ENTRY": [
            # A combined gather: (inputs, outputs); 2 x 4 x 8 in, 2 x 16 x 8 out, bf16.
            "  %s = ((bf16[4,8]{1,0}, bf16[4,8]{1,0}), (bf16[16,8]{1,0}, bf16[16,8]{1,0})) "
            "all-gather-start(%p, %q), dimensions={0}",
            "  %d = (bf16[16,8]{1,0}, bf16[16,8]{1,0}) all-gather-done(%s)",
            # A combined all-reduce: its outputs, as its inputs.
            "  %r = (f32[10]{0}, f32[6]{0}) all-reduce(%a, %b), to_apply=%add",
            "  %t = ((f32[64,2]{1,0}), f32[4,2]{1,0}) reduce-scatter-start(%g), replica_groups="
            "[16,16]<=[256], dimensions={0}, to_apply=%add",
            "  %c = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%x), "
            "source_target_pairs={{0,1}}",
            '  %w = (s32[], f32[4]{0}) while(%t), condition=%c, body=%b, backend_config={"kno'
            'wn_trip_count":{"n":"3"}}',
            "  %u = (s32[], f32[4]{0}) while(%t), condition=%c, body=%b",  # Count unknown: once.
            "  %k = f32[4]{0} call(%x), to_apply=%inner",
            "  %i = f32[4]{0} conditional(%p, %x, %x), branch_computations={%cheap, %dear}",
        ],
        "b": [  # Synchronous: the output is one member's share of a group of 4.
            "  %x = f32[2]{0} reduce-scatter(%y), replica_groups={{0,1,2,3}}, dimensions={0}"
        ],
        "c": [],
        "inner": ["  %a = f4e2m1fn[16]{0} all-to-all(%x), dimensions={0}"],  # 4-bit: 8 bytes.
        "cheap": ["  %a = f32[1]{0} all-reduce(%x), to_apply=%add"],
        "dear": ["  %a = f32[100]{0} all-reduce(%x), to_apply=%add"],
    }
    assert gpu_compile.collectives(comps) == {
        "all-gather": [1, 2 * 16 * 8 * 2],
        "all-reduce": [2, (10 + 6) * 4 + 400],
        "reduce-scatter": [1 + 4, 64 * 2 * 4 + 4 * 2 * 4 * 4],
        "collective-permute": [1, 32],
        "all-to-all": [1, 8],
    }


@pytest.mark.multidevice(8)
def test_collectives_of_a_compiled_program():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    f = jax.jit(lambda x: x * 2, in_shardings=split, out_shardings=whole)
    hlo = f.lower(jax.ShapeDtypeStruct((64,), jnp.float32)).compile().as_text()
    assert gpu_compile.collectives(gpu_compile.computations(hlo)) == {"all-gather": [1, 256]}
    # Three sums XLA combines into one all-reduce of a tuple: all three arrays count.
    g = jax.jit(
        lambda a, b, c: (a.sum(0), b.sum(0), c.sum(0)),
        in_shardings=(split,) * 3,
        out_shardings=(whole,) * 3,
    )
    arg = jax.ShapeDtypeStruct((8, 256), jnp.float32)
    hlo = g.lower(arg, arg, arg).compile().as_text()
    found = gpu_compile.collectives(gpu_compile.computations(hlo))
    assert found["all-reduce"][1] == 3 * 256 * 4, found


def test_targets():
    text = gpu_compile.target_config("h100")
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
    assert "cuda_compute_capability { major: 9 }" in text
    with pytest.raises(ValueError, match="unknown target 'a100'; known: h100, h200"):
        gpu_compile.target_config("a100")


def cuda_plugin_installed() -> bool:
    return importlib.util.find_spec("jax_plugins") is not None and any(
        importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)
    )


@pytest.mark.skipif(cuda_plugin_installed(), reason="JAX's CUDA plugin is installed here")
def test_without_the_cuda_plugin_the_error_says_what_to_install():
    with pytest.raises(SystemExit, match=r"jax-cuda12-plugin\[with-cuda\]==0.10.2"):
        gpu_compile.target_mesh("h100")


@pytest.mark.parametrize(
    "argv",
    [
        ["--parts", "config"],  # The config part without a config.
        ["--config", "configs/vcppo.py:small"],  # A config without its part.
        ["--parts", "train,bogus"],
        ["--shapes", "8x2048x3"],
        ["--decode", "64x128"],
    ],
)
def test_bad_flags_are_usage_errors_before_any_compile(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["gpu_compile", *argv])
    with pytest.raises(SystemExit) as e:
        gpu_compile.main()
    assert e.value.code == 2
