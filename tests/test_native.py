"""Native CPU kernels other than GAE (tested in test_advantages.py): the packed matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcppo_jax import native

pytestmark = [
    pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler"),
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are CPU-only"),
]


@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 5, 3),  # Smaller than one tile.
        (7, 64, 100),  # Ragged rows (not a multiple of the 8-row block) and columns.
        (32, 768, 2048),  # Large enough to be split over the thread pool.
        (13, 300, 4801),
        (0, 4, 5),
    ],
)
@pytest.mark.parametrize("transposed", [False, True])
def test_packed_matmul_matches_numpy(m, k, n, transposed):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    stored = w.T.copy() if transposed else w

    @jax.jit
    def f(x, stored):
        return native.packed_matmul(x, native.pack_kernel(stored, transposed=transposed), n)

    got = np.asarray(f(x, stored))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_packed_matmul_keeps_leading_axes_and_is_repeatable():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 96)).astype(np.float32)
    w = rng.standard_normal((96, 50)).astype(np.float32)
    packed = native.pack_kernel(jnp.asarray(w))
    assert packed.shape == (2, 96, native.TILE)
    np.testing.assert_array_equal(np.asarray(packed[1, :, 2:]), 0.0)  # Zero-padded last tile.
    f = jax.jit(lambda x, p: native.packed_matmul(x, p, 50))
    a, b = np.asarray(f(x, packed)), np.asarray(f(x, packed))
    np.testing.assert_array_equal(a, b)  # Same split of work, same sums, every call.
    np.testing.assert_allclose(a, x @ w, rtol=1e-5, atol=1e-4)


def test_packed_matmul_rejects_mismatched_shapes():
    packed = native.pack_kernel(jnp.ones((8, 60)))
    with pytest.raises(ValueError, match=r"packed kernel \(2, 8, 48\) does not fit x \[..., 9\]"):
        native.packed_matmul(jnp.ones((2, 9)), packed, 60)
    with pytest.raises(ValueError, match="n=200"):
        native.packed_matmul(jnp.ones((2, 8)), packed, 200)


def test_decode_kernels_unavailable_without_a_compiler(remove_compiler):
    native._decode_dll.cache_clear()
    remove_compiler()
    try:
        with pytest.warns(UserWarning, match=r"decode kernels are unavailable \(no C\+\+ compiler"):
            assert not native.decode_cpu_available()
        assert not native.decode_cpu_preferred()
        with pytest.raises(ValueError, match="could not be built"):
            native.packed_matmul(jnp.ones((2, 8)), native.pack_kernel(jnp.ones((8, 5))), 5)
    finally:
        native._decode_dll.cache_clear()  # Rebuilt (from the cache) by the next caller.


def attention_reference(q, k, v, visible):
    """NumPy loop, float64: row b's query heads attend to slots 0 .. visible[b] - 1."""
    b_len, h_len, g_len, d = q.shape
    out = np.zeros(q.shape)
    for b in range(b_len):
        n = min(max(int(visible[b]), 1), k.shape[2])
        for h in range(h_len):
            for g in range(g_len):
                s = k[b, h, :n].astype(np.float64) @ q[b, h, g] / np.sqrt(d)
                p = np.exp(s - s.max())
                out[b, h, g] = (p / p.sum()) @ v[b, h, :n]
    return out


@pytest.mark.parametrize(
    "shape",
    [
        (5, 2, 3, 64, 40),  # [B, Hkv, G, D, S]: vector path (D a multiple of 16).
        (3, 1, 1, 12, 7),  # Scalar path, one head.
        (32, 2, 6, 64, 320),  # Large enough to be split over the thread pool.
    ],
)
def test_decode_attention_matches_numpy(shape):
    b, h, g, d, s = shape
    rng = np.random.default_rng(s)
    q = rng.standard_normal((b, h, g, d)).astype(np.float32)
    k = rng.standard_normal((b, h, s, d)).astype(np.float32)
    v = rng.standard_normal((b, h, s, d)).astype(np.float32)
    # Ragged lengths, including the clipped ends: 0 -> slot 0 only, > S -> every slot.
    visible = rng.integers(1, s + 1, b).astype(np.int32)
    visible[0], visible[-1] = 0, s + 5
    # Slots a row cannot see hold garbage that must not leak in (NaN would show).
    for i in range(b):
        n = min(max(int(visible[i]), 1), s)
        k[i, :, n:] = np.nan
        v[i, :, n:] = np.nan
    got = np.asarray(jax.jit(native.decode_attention)(q, k, v, jnp.asarray(visible)))
    np.testing.assert_allclose(got, attention_reference(q, k, v, visible), rtol=2e-5, atol=2e-6)


def test_decode_attention_rejects_mismatched_shapes():
    q = jnp.ones((2, 2, 3, 8))
    with pytest.raises(ValueError, match=r"must be \[B, Hkv, G, D\] and \[B, Hkv, S, D\]"):
        native.decode_attention(q, jnp.ones((2, 1, 5, 8)), jnp.ones((2, 1, 5, 8)), jnp.ones(2))
