"""Attention implementations: the reference against a NumPy loop, blockwise against the
reference (outputs and gradients, float32 and bfloat16), and no T x T buffer in blockwise; cuDNN
over a KV cache (decode step, prompt pass) with its kernel emulated, and on a GPU for real; the
Pallas TPU splash kernel against the reference in TPU interpret mode (outputs and gradients, a
length that is no multiple of its tile, bfloat16, sharded over 8 devices, in the model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcppo_jax.models import attention

# TPU interpret mode simulates the chip with host-side programs: a CPU test, skipped where the
# suite runs on a GPU (slow there, and not what that run is for).
interpret_mode = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="TPU interpret mode: simulated on the CPU only"
)


def _inputs(b=2, kvh=2, g=3, t=37, s=37, d=8, offset=0, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, kvh, g, t, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, kvh, s, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, kvh, s, d)), dtype)
    q_pos = jnp.asarray(np.arange(t)[None] + offset + np.arange(b)[:, None] * 0, jnp.int32)
    k_pos = jnp.asarray(np.tile(np.arange(s), (b, 1)), jnp.int32)
    return q, k, v, q_pos, k_pos


def _numpy_attention(q, k, v, q_pos, k_pos):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, kvh, g, t, d = q.shape
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(kvh):
            for gi in range(g):
                for ti in range(t):
                    seen = [si for si in range(k.shape[2]) if k_pos[bi, si] <= q_pos[bi, ti]]
                    if not seen:
                        continue
                    s = np.array([q[bi, h, gi, ti] @ k[bi, h, si] for si in seen]) / np.sqrt(d)
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    rows = v[bi, h, seen]
                    out[bi, h, gi, ti] = (p[:, None] * rows).sum(axis=0)
    return out


def test_reference_matches_a_numpy_loop():
    # Queries at positions 5.. over a cache of 12 slots (the prompt pass / a later chunk).
    q, k, v, q_pos, k_pos = _inputs(b=2, kvh=1, g=2, t=4, s=12, d=4, offset=5)
    q_pos = q_pos.at[1].set(q_pos[1] - 6)  # Row 1: its first query (position -1) sees nothing.
    got = attention.reference(q, k, v, q_pos, k_pos)
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, q_pos, k_pos), atol=1e-5)


@pytest.mark.parametrize(
    "t,s,block,offset", [(37, 37, 8, 0), (37, 37, 64, 0), (5, 40, 16, 35), (16, 16, 16, 0)]
)
def test_blockwise_matches_reference_outputs_and_gradients(t, s, block, offset):
    q, k, v, q_pos, k_pos = _inputs(t=t, s=s, offset=offset)
    ref = lambda q, k, v: attention.reference(q, k, v, q_pos, k_pos)
    blk = lambda q, k, v: attention.blockwise(q, k, v, q_pos, k_pos, block=block)
    np.testing.assert_allclose(blk(q, k, v), ref(q, k, v), atol=2e-5)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)  # A generic cotangent.
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.jit(jax.grad(loss(blk), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_blk, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_blockwise_right_padding_and_bfloat16():
    q, k, v, q_pos, k_pos = _inputs(t=24, s=24, dtype=jnp.bfloat16)
    got = attention.blockwise(q, k, v, q_pos, k_pos, block=8)
    assert got.dtype == jnp.bfloat16
    want = attention.reference(*(x.astype(jnp.float32) for x in (q, k, v)), q_pos, k_pos)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)
    # Right padding: slots past a row's length change no real token's output.
    n = 17
    k2 = k.at[:, :, n:].set(100.0)
    v2 = v.at[:, :, n:].set(-100.0)
    a = attention.blockwise(q, k, v, q_pos, k_pos, block=8)[:, :, :, :n]
    b = attention.blockwise(q, k2, v2, q_pos, k_pos, block=8)[:, :, :, :n]
    np.testing.assert_array_equal(a, b)


def _largest_buffer(f, *args):
    """The size in elements of the largest array in the compiled HLO of ``f``."""
    import re

    hlo = jax.jit(f).lower(*args).compile().as_text()
    sizes = [
        int(np.prod([int(x) for x in dims.split(",") if x]))
        for dims in re.findall(r"f32\[([\d,]*)\]", hlo)
    ]
    return max(sizes)


def test_blockwise_holds_no_t_by_t_buffer_in_forward_and_backward():
    t, block = 512, 64
    q, k, v, q_pos, k_pos = _inputs(b=1, kvh=1, g=2, t=t, s=t, d=8)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, q_pos, k_pos) ** 2)

    grad = lambda f: jax.grad(loss(f), argnums=(0, 1, 2))
    blk = lambda *a: attention.blockwise(*a, block=block)
    assert _largest_buffer(grad(attention.reference), q, k, v) >= 2 * t * t  # [1,1,2,T,T]
    assert _largest_buffer(grad(blk), q, k, v) <= 2 * t * block  # One block's scores.


def test_resolve():
    assert attention.resolve("auto", "gpu") == "cudnn"
    assert attention.resolve("auto", "gpu", "bfloat16") == "cudnn"
    assert attention.resolve("auto", "gpu", "float32") == "blockwise"  # cuDNN lacks float32.
    assert attention.resolve("cudnn", "gpu", "float32") == "cudnn"  # As asked (then refused).
    assert attention.resolve("auto", "gpu", "bfloat16", head_dim=128) == "cudnn"
    for d in (4, 12, 512):  # Heads cuDNN's kernel does not take.
        assert attention.resolve("auto", "gpu", "bfloat16", head_dim=d) == "blockwise"
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "cpu") == "blockwise"
    assert attention.resolve("xla") == "xla"
    with pytest.raises(ValueError, match="attention='flash'"):
        attention.resolve("flash")


def test_kernels_that_cannot_run_are_refused_with_the_cure():
    with pytest.raises(attention.BackendError, match="this backend is cpu: use auto"):
        attention.check_available("cudnn", "bfloat16", "cpu")
    with pytest.raises(attention.BackendError, match="model.dtype is float32: set model.dtype"):
        attention.check_available("cudnn", "float32", "gpu")
    with pytest.raises(
        attention.BackendError, match="multiples of 8 up to 256 here, and the model's is 4"
    ):
        attention.check_available("cudnn", "bfloat16", "gpu", head_dim=4)
    with pytest.raises(attention.BackendError, match="model.attention='splash'"):
        attention.check_available("splash", "float32", "cpu")
    attention.check_available("auto", "bfloat16", "gpu", head_dim=4)  # blockwise
    for name, dtype, backend in [
        ("auto", "float32", "gpu"),  # blockwise
        ("auto", "bfloat16", "gpu"),  # cudnn
        ("cudnn", "float16", "gpu"),
        ("auto", "float32", "cpu"),
        ("xla", "float32", "cpu"),
        ("blockwise", "bfloat16", "tpu"),
    ]:
        attention.check_available(name, dtype, backend)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's kernel needs an NVIDIA GPU")
def test_cudnn_matches_reference_on_a_gpu():
    """Training-pass layout (slot = position), bf16 as cuDNN's flash kernel wants it."""
    q, k, v, q_pos, k_pos = _inputs(b=2, kvh=2, g=4, t=256, s=256, d=64, dtype=jnp.bfloat16)
    got = attention.cudnn(q, k, v)
    want = attention.reference(q, k, v, q_pos, k_pos)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.bfloat16)
    g_cudnn = jax.grad(lambda *a: jnp.sum(attention.cudnn(*a) * w).astype(jnp.float32), (0, 1, 2))
    g_ref = jax.grad(
        lambda *a: jnp.sum(attention.reference(*a, q_pos, k_pos) * w).astype(jnp.float32),
        (0, 1, 2),
    )
    for a, b in zip(g_cudnn(q, k, v), g_ref(q, k, v), strict=True):  # |dV| reaches ~8: bf16 ulps.
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=0.1, rtol=2e-2
        )


def emulated_cudnn_attention(
    query, key, value, q_seqlen=None, kv_seqlen=None, *, scale, mask_type, qkv_layout
):
    """cuDNN's fused attention as its JAX wrapper documents it, in plain JAX, for the subset
    ``cudnn_cached`` uses: BNTH layout, grouped key heads (query head n reads key head
    n // (N / Nkv)), padding masks from the per-row lengths, causal from the top left."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    assert qkv_layout == "BNTH"
    assert mask_type in (fa.MaskType.PADDING, fa.MaskType.PADDING_CAUSAL)
    b, n, t, d = query.shape
    group = n // key.shape[1]
    k, v = (jnp.repeat(x, group, axis=1).astype(jnp.float32) for x in (key, value))
    s = jnp.einsum("bntd,bnsd->bnts", query.astype(jnp.float32), k) * scale
    ti, si = jnp.arange(t)[:, None], jnp.arange(k.shape[2])[None, :]
    seen = (si[None] < kv_seqlen[:, None, None]) & (ti[None] < q_seqlen[:, None, None])
    if mask_type == fa.MaskType.PADDING_CAUSAL:
        seen = seen & (si <= ti)[None]
    p = jax.nn.softmax(jnp.where(seen[:, None], s, -jnp.inf), axis=-1)
    p = jnp.where(jnp.isnan(p), 0.0, p)
    return jnp.einsum("bnts,bnsd->bntd", p, v).astype(query.dtype)


def _cached_cases(dtype, d=8):
    """(q, k, v cache, kv_len, causal, q_pos) for a decode step at ragged slots and for the
    prompt pass from slot 0; cache slots past kv_len hold noise that must stay unseen."""
    b, kvh, g, s = 3, 2, 3, 24
    q1, k, v, _, k_pos = _inputs(b=b, kvh=kvh, g=g, t=1, s=s, d=d, dtype=dtype)
    slots = jnp.asarray([0, 9, 23], jnp.int32)
    yield q1, k, v, slots + 1, False, slots[:, None]
    qp, _, _, q_pos, _ = _inputs(b=b, kvh=kvh, g=g, t=10, s=s, d=d, seed=1, dtype=dtype)
    yield qp, k, v, jnp.full((b,), 10, jnp.int32), True, q_pos


def test_cudnn_cached_wiring_against_the_reference_with_an_emulated_kernel(monkeypatch):
    """Runs anywhere: the layouts, head grouping and lengths that ``cudnn_cached`` hands the
    kernel, with the kernel emulated (``emulated_cudnn_attention``)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    monkeypatch.setattr(fa, "dot_product_attention", emulated_cudnn_attention)
    for q, k, v, kv_len, causal, q_pos in _cached_cases(jnp.float32):
        got = attention.cudnn_cached(q, k, v, kv_len, causal=causal)
        k_pos = jnp.broadcast_to(jnp.arange(k.shape[2]), (q.shape[0], k.shape[2]))
        want = _numpy_attention(q, k, v, np.asarray(q_pos), np.asarray(k_pos))
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    with pytest.raises(ValueError, match="one query per row"):
        attention.cudnn_cached(q, k, v, kv_len, causal=False)


def test_cudnn_cached_public_path_against_the_reference():
    """The path taken where JAX's private wrapper changed: the public API, here with its XLA
    implementation (on a GPU the same call with ``cudnn``, tested below)."""
    for q, k, v, kv_len, causal, q_pos in _cached_cases(jnp.float32):
        got = attention.cudnn_cached(q, k, v, kv_len, causal=causal, implementation="xla")
        k_pos = jnp.broadcast_to(jnp.arange(k.shape[2]), (q.shape[0], k.shape[2]))
        want = _numpy_attention(q, k, v, np.asarray(q_pos), np.asarray(k_pos))
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_a_changed_private_cudnn_wrapper_is_detected_with_a_warning(monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo as fa

    assert attention.private_cudnn_api() is fa  # This JAX's wrapper takes what is passed.

    def moved(query, key, value, *, scale, mask_type):  # No lengths, no layout.
        raise AssertionError("must not be called")

    monkeypatch.setattr(fa, "dot_product_attention", moved)
    attention.private_cudnn_api.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"lacks \['q_seqlen', 'kv_seqlen', 'qkv_layout'\]"):
            assert attention.private_cudnn_api() is None
    finally:
        attention.private_cudnn_api.cache_clear()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's kernel needs an NVIDIA GPU")
@pytest.mark.parametrize("wrapper", ["private", "public"])
def test_cudnn_cached_matches_reference_on_a_gpu(wrapper, monkeypatch):
    """The real kernel, decode step and prompt pass over a cache, bf16, through JAX's private
    wrapper (the cache's layout) and through the public API (the fallback)."""
    if wrapper == "public":
        monkeypatch.setattr(attention, "private_cudnn_api", lambda: None)
    elif attention.private_cudnn_api() is None:
        pytest.fail(f"jax {jax.__version__}'s private cuDNN wrapper changed: see the warning")
    for q, k, v, kv_len, causal, q_pos in _cached_cases(jnp.bfloat16, d=64):
        got = attention.cudnn_cached(q, k, v, kv_len, causal=causal)
        k_pos = jnp.broadcast_to(jnp.arange(k.shape[2]), (q.shape[0], k.shape[2]))
        want = attention.reference(q, k, v, q_pos, k_pos)
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2
        )


def _causal(b, kvh, g, t, d, dtype=jnp.float32, seed=0):
    q, k, v, pos, _ = _inputs(b=b, kvh=kvh, g=g, t=t, s=t, d=d, seed=seed, dtype=dtype)
    return q, k, v, pos


@interpret_mode
@pytest.mark.parametrize("t,block", [(200, 128), (128, 128)])
def test_splash_matches_reference_outputs_and_gradients(t, block):
    """TPU interpret mode runs the kernel's own forward and backward Pallas programs on the CPU;
    t = 200 is padded to 256 inside (the padded slots must not reach a real query)."""
    q, k, v, pos = _causal(2, 2, 3, t, 16)
    spl = lambda q, k, v: attention.splash(q, k, v, block=block, interpret=True)
    ref = lambda q, k, v: attention.reference(q, k, v, pos, pos)
    np.testing.assert_allclose(jax.jit(spl)(q, k, v), ref(q, k, v), atol=2e-5)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
    g_spl = jax.jit(jax.grad(loss(spl), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_spl, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5)


@interpret_mode
def test_splash_bfloat16():
    q, k, v, pos = _causal(1, 2, 2, 128, 32, dtype=jnp.bfloat16)
    got = attention.splash(q, k, v, interpret=True)
    assert got.dtype == jnp.bfloat16
    want = attention.reference(*(x.astype(jnp.float32) for x in (q, k, v)), pos, pos)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


@interpret_mode
@pytest.mark.multidevice(8)
def test_splash_runs_per_shard_under_a_mesh():
    """Under ``jax.set_mesh`` the kernel runs once per shard (rows over data, key heads over
    tensor), with no gather of the sharded operands, and gives the unsharded numbers."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    q, k, v, pos = _causal(2, 4, 2, 64, 16)
    on = NamedSharding(mesh, P("data", "tensor"))
    qs, ks, vs = (jax.device_put(x, on) for x in (q, k, v))
    f = jax.jit(lambda *a: attention.splash(*a, interpret=True))
    with jax.set_mesh(mesh):
        hlo = f.lower(qs, ks, vs).compile().as_text()
        got = f(qs, ks, vs)
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert got.sharding.spec[:2] == ("data", "tensor")
    np.testing.assert_allclose(got, attention.reference(q, k, v, pos, pos), atol=2e-5)


@pytest.mark.multidevice(8)
def test_cudnn_operands_are_laid_out_alike_under_a_mesh():
    """cuDNN's partitioner takes query, key and value only when they are sharded alike: under
    a mesh they are constrained to one layout (rows over data, heads over tensor where the
    key heads divide), whatever layouts they arrive in, as a KV cache made inside the prompt
    pass does (found compiling ``small`` on 8 GPUs for an H100 target)."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    q = jnp.zeros((4, 8, 1, 16))  # [B, H, T, D]: 8 query heads, 4 key heads.
    k = jnp.zeros((4, 4, 32, 16))
    f = jax.jit(lambda *a: attention._alike(*a, heads_axis=1))
    args = (
        jax.device_put(q, NamedSharding(mesh, P(None, "tensor"))),
        jax.device_put(k, NamedSharding(mesh, P("data"))),
        jax.device_put(k, NamedSharding(mesh, P())),
    )
    with jax.set_mesh(mesh):
        out = f(*args)
    first_two = lambda x: (*x.sharding.spec, None, None)[:2]
    assert {first_two(x) for x in out} == {("data", "tensor")}
    # Two key heads do not divide over 4 tensor devices: heads stay whole, for all three.
    k2 = jnp.zeros((4, 2, 32, 16))
    with jax.set_mesh(mesh):
        out = f(q, k2, k2)
    assert {first_two(x) for x in out} == {("data", None)}
    # The training layout [B, T, H, D] (heads on axis 2), and per-row lengths split as rows.
    qt, kt = jnp.zeros((4, 32, 8, 16)), jnp.zeros((4, 32, 4, 16))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: attention._alike(*a[:3], heads_axis=2, lengths=a[3:]))(
            qt, kt, kt, jnp.zeros((4,), jnp.int32)
        )
    assert {tuple(x.sharding.spec) for x in out[:3]} == {("data", None, "tensor")}
    assert out[3].sharding.spec == P("data")


def test_splash_block_must_fill_the_lanes():
    q, k, v, _ = _causal(1, 1, 1, 64, 8)
    with pytest.raises(ValueError, match="block=64: the splash kernel's tile must be a multiple"):
        attention.splash(q, k, v, block=64, interpret=True)


@interpret_mode
def test_model_with_splash_attention(monkeypatch):
    """The model's training pass through splash (TPU interpret mode) gives the logits of the
    materialised reference; off a TPU without interpret mode, a clear error names the cure."""
    import dataclasses

    from vcppo_jax import models

    config = models.ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, attention="xla",
    )  # fmt: skip
    params = models.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 40)), jnp.int32)
    want = models.forward(config, params, tokens)
    splash_config = dataclasses.replace(config, attention="splash")
    with pytest.raises(ValueError, match="Pallas TPU kernel.*VCPPO_PALLAS_INTERPRET=1"):
        models.forward(splash_config, params, tokens)
    monkeypatch.setenv(attention.INTERPRET_ENV, "1")
    np.testing.assert_allclose(models.forward(splash_config, params, tokens), want, atol=1e-4)
