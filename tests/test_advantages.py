"""decoupled_gae and friends against a NumPy loop, rlax, and closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vcppo_jax import advantages as adv_lib
from vcppo_jax.advantages import decoupled_gae, length_adaptive_lambda, masked_whiten

METHODS = ("auto", "matmul", "associative", "scan")


def numpy_gae(r, v, lengths, gamma, lam):
    """Per-sequence reverse loop, float64. lam: scalar, [B] or [B, T]."""
    b, t = r.shape
    lam = np.broadcast_to(
        np.asarray(lam, np.float64).reshape((b, 1) if np.ndim(lam) == 1 else np.shape(lam)), (b, t)
    )
    out = np.zeros((b, t))
    for i in range(b):
        acc = 0.0
        for s in reversed(range(lengths[i])):
            v_next = v[i, s + 1] if s + 1 < lengths[i] else 0.0
            delta = r[i, s] + gamma * v_next - v[i, s]
            acc = delta + gamma * lam[i, s] * acc
            out[i, s] = acc
    return out


def make_batch(rng, b, t, lengths=None, terminal_only=False):
    if lengths is None:
        lengths = rng.integers(0, t + 1, size=b)
    lengths = np.asarray(lengths)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    if terminal_only:
        rewards = np.zeros((b, t), np.float32)
        rows = np.nonzero(lengths)[0]
        rewards[rows, lengths[rows] - 1] = rng.choice([-1.0, 1.0], size=len(rows))
    else:
        rewards = rng.normal(size=(b, t)).astype(np.float32)
    return rewards, values, mask, lengths


def check_against_numpy(r, v, mask, lengths, gamma, lam_a, lam_c, method, atol=2e-5):
    adv, ret = decoupled_gae(
        r, v, mask, gamma=gamma, lambda_actor=lam_a, lambda_critic=lam_c, method=method
    )
    want_adv = numpy_gae(r.astype(np.float64), v.astype(np.float64), lengths, gamma, lam_a)
    want_ret = numpy_gae(r.astype(np.float64), v.astype(np.float64), lengths, gamma, lam_c)
    want_ret = (want_ret + v) * mask
    scale = 1.0 + np.abs(want_ret).max()
    np.testing.assert_allclose(np.asarray(adv), want_adv, atol=atol * scale)
    np.testing.assert_allclose(np.asarray(ret), want_ret, atol=atol * scale)
    assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lam_kind", ["scalar", "row", "token"])
def test_matches_numpy_loop(method, lam_kind):
    rng = np.random.default_rng(0)
    b, t = 6, 300  # Not a multiple of the chunk: exercises padding.
    r, v, mask, lengths = make_batch(rng, b, t, lengths=[0, 1, 16, 17, 299, 300])
    lam_a = {
        "scalar": 0.95,
        "row": rng.uniform(0.5, 1.0, b),
        "token": rng.uniform(0.5, 1.0, (b, t)),
    }[lam_kind]
    if method == "matmul" and lam_kind == "token":
        with pytest.raises(ValueError, match="matmul"):
            decoupled_gae(
                r, v, mask, gamma=0.99, lambda_actor=lam_a, lambda_critic=1.0, method=method
            )
        return
    check_against_numpy(r, v, mask, lengths, 0.99, lam_a, 1.0, method)


@pytest.mark.parametrize("method", METHODS)
def test_matches_rlax(method):
    rng = np.random.default_rng(1)
    b, t = 4, 130
    r, v, mask, lengths = make_batch(rng, b, t, lengths=[130, 64, 65, 3], terminal_only=True)
    gamma, lam_a, lam_c = 0.97, 0.9, 0.6
    adv, ret = decoupled_gae(
        r, v, mask, gamma=gamma, lambda_actor=lam_a, lambda_critic=lam_c, method=method
    )
    for i, n in enumerate(lengths):
        values = jnp.concatenate([v[i, :n], jnp.zeros(1)])
        discount = jnp.full((n,), gamma)
        for lam, got, plus_v in ((lam_a, adv, False), (lam_c, ret, True)):
            want = rlax.truncated_generalized_advantage_estimation(r[i, :n], discount, lam, values)
            want = want + (v[i, :n] if plus_v else 0.0)
            np.testing.assert_allclose(np.asarray(got[i, :n]), want, atol=2e-5, rtol=1e-5)
            np.testing.assert_array_equal(np.asarray(got[i, n:]), 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_lambda_one_is_monte_carlo_return(method):
    rng = np.random.default_rng(2)
    r, v, mask, lengths = make_batch(rng, 5, 200, terminal_only=True)
    gamma = 0.99
    adv, ret = decoupled_gae(
        r, v, mask, gamma=gamma, lambda_actor=1.0, lambda_critic=1.0, method=method
    )
    # G_t = sum_{s >= t} gamma^(s - t) r_s, independent of the values.
    for i, n in enumerate(lengths):
        g = np.array([sum(gamma ** (s - t) * r[i, s] for s in range(t, n)) for t in range(n)])
        np.testing.assert_allclose(np.asarray(ret[i, :n]), g, atol=1e-5)
        np.testing.assert_allclose(np.asarray(adv[i, :n]), g - v[i, :n], atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_lambda_zero_is_td_error(method):
    rng = np.random.default_rng(3)
    r, v, mask, lengths = make_batch(rng, 5, 90)
    gamma = 0.9
    adv, ret = decoupled_gae(
        r, v, mask, gamma=gamma, lambda_actor=0.0, lambda_critic=0.0, method=method
    )
    v_next = np.concatenate([v[:, 1:], np.zeros((5, 1))], axis=1) * np.concatenate(
        [mask[:, 1:], np.zeros((5, 1))], axis=1
    )
    td = (r + gamma * v_next - v) * mask
    np.testing.assert_allclose(np.asarray(adv), td, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), (r + gamma * v_next) * mask, atol=1e-5)


def test_decoupled_lambdas_differ_and_critic_target_uses_lambda_critic():
    """The peers' defect: returns = A(lambda_actor) + V. Here returns must use lambda_critic."""
    rng = np.random.default_rng(4)
    r, v, mask, lengths = make_batch(rng, 3, 120, lengths=[120, 100, 50], terminal_only=True)
    adv, ret = decoupled_gae(r, v, mask, gamma=1.0, lambda_actor=0.95, lambda_critic=1.0)
    terminal = r.sum(axis=1)  # With gamma = lambda_critic = 1, the target is the final reward.
    np.testing.assert_allclose(np.asarray(ret), terminal[:, None] * mask, atol=1e-5)
    assert not np.allclose(np.asarray(adv) + v * mask, np.asarray(ret), atol=1e-3)


def test_length_zero_rows_nan_padding_and_bfloat16():
    rng = np.random.default_rng(5)
    r, v, mask, lengths = make_batch(rng, 4, 64, lengths=[0, 0, 10, 64])
    r_bad, v_bad = r.copy(), v.copy()
    r_bad[mask == 0] = np.nan  # Garbage in the padding must not leak.
    v_bad[mask == 0] = np.inf
    for method in METHODS:
        adv, ret = decoupled_gae(
            r_bad, v_bad, mask, gamma=1.0, lambda_actor=0.95, lambda_critic=1.0, method=method
        )
        assert np.isfinite(np.asarray(adv)).all() and np.isfinite(np.asarray(ret)).all()
        np.testing.assert_array_equal(np.asarray(adv[:2]), 0.0)
        np.testing.assert_array_equal(np.asarray(ret[:2]), 0.0)
    # bfloat16 storage, float32 accumulation: matches the float32 run on the rounded inputs.
    r16, v16 = jnp.asarray(r, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    adv16, ret16 = decoupled_gae(r16, v16, mask, gamma=1.0, lambda_actor=0.95, lambda_critic=1.0)
    assert adv16.dtype == jnp.float32
    adv32, ret32 = decoupled_gae(
        r16.astype(jnp.float32),
        v16.astype(jnp.float32),
        mask,
        gamma=1.0,
        lambda_actor=0.95,
        lambda_critic=1.0,
    )
    np.testing.assert_allclose(np.asarray(adv16), np.asarray(adv32), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret16), np.asarray(ret32), atol=1e-6)


def test_empty_time_axis():
    adv, ret = decoupled_gae(
        np.zeros((3, 0)),
        np.zeros((3, 0)),
        np.zeros((3, 0)),
        gamma=1.0,
        lambda_actor=0.95,
        lambda_critic=1.0,
    )
    assert adv.shape == ret.shape == (3, 0)


def test_no_retrace_for_new_values():
    rng = np.random.default_rng(6)
    r, v, mask, _ = make_batch(rng, 4, 48)
    decoupled_gae(r, v, mask, gamma=1.0, lambda_actor=0.95, lambda_critic=1.0)
    before = adv_lib._decoupled_gae._cache_size()
    for lam in (0.9, 0.99, 0.5):
        r2, v2, mask2, _ = make_batch(rng, 4, 48)
        decoupled_gae(r2, v2, mask2, gamma=0.99, lambda_actor=lam, lambda_critic=1.0)
    assert adv_lib._decoupled_gae._cache_size() == before


def test_bad_inputs_raise_clear_errors():
    z = np.zeros((2, 5))
    with pytest.raises(ValueError, match="values must have the shape"):
        decoupled_gae(z, np.zeros((2, 4)), z, gamma=1.0, lambda_actor=0.9, lambda_critic=1.0)
    with pytest.raises(ValueError, match=r"lambda_actor must be a scalar, \[B\]"):
        decoupled_gae(z, z, z, gamma=1.0, lambda_actor=np.ones(5), lambda_critic=1.0)
    with pytest.raises(ValueError, match=r"lambda_critic must lie in \[0, 1\]"):
        decoupled_gae(z, z, z, gamma=1.0, lambda_actor=0.9, lambda_critic=1.5)
    with pytest.raises(ValueError, match="rewards must be"):
        decoupled_gae(np.zeros(5), z, z, gamma=1.0, lambda_actor=0.9, lambda_critic=1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        decoupled_gae(z, z, z, gamma=1.0, lambda_actor=0.9, lambda_critic=1.0, method="fast")


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 5),
    t=st.integers(1, 150),
    gamma=st.floats(0.5, 1.0),
    lam_a=st.floats(0.0, 1.0),
    lam_c=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(METHODS),
)
def test_random_shapes_and_lengths(b, t, gamma, lam_a, lam_c, seed, method):
    rng = np.random.default_rng(seed)
    r, v, mask, lengths = make_batch(rng, b, t)
    check_against_numpy(r, v, mask, lengths, gamma, lam_a, lam_c, method, atol=5e-5)


@pytest.mark.multidevice(8)
def test_sharded_batch_matches_single_device():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data", None))
    rng = np.random.default_rng(7)
    r, v, mask, _ = make_batch(rng, 16, 256)
    lam_rows = rng.uniform(0.8, 1.0, 16).astype(np.float32)
    for lam_a in (0.95, lam_rows):
        want = decoupled_gae(r, v, mask, gamma=1.0, lambda_actor=lam_a, lambda_critic=1.0)
        args = [jax.device_put(x, sharding) for x in (r, v, mask)]
        lam = (
            lam_a
            if np.ndim(lam_a) == 0
            else jax.device_put(lam_a, NamedSharding(mesh, PartitionSpec("data")))
        )
        got = decoupled_gae(*args, gamma=1.0, lambda_actor=lam, lambda_critic=1.0)
        for g, w in zip(got, want, strict=True):  # (Sharded, auto picks another solver.)
            assert g.sharding.spec[0] == "data" or len(g.sharding.device_set) == 8
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_length_adaptive_lambda():
    lengths = np.array([0, 10, 20, 21, 100, 1000, 8192])
    got = np.asarray(length_adaptive_lambda(lengths, alpha=0.05))
    want = np.clip([1 - 1 / (0.05 * n) if n else 0.0 for n in lengths], 0.0, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[1] == 0.0 and got[2] == 0.0 and 0.0 < got[3] < got[4] < got[5] < 1.0
    with pytest.raises(ValueError, match="alpha"):
        length_adaptive_lambda(lengths, alpha=0.0)


def test_masked_whiten():
    rng = np.random.default_rng(8)
    x = rng.normal(3.0, 2.0, size=(4, 30)).astype(np.float32)
    _, _, mask, _ = make_batch(rng, 4, 30, lengths=[30, 12, 0, 5])
    x_pad = np.where(mask > 0, x, 1e6).astype(np.float32)  # Padding must not count.
    out = np.asarray(masked_whiten(x_pad, mask))
    real = x[mask > 0]
    want = (real - real.mean()) / real.std(ddof=1)
    np.testing.assert_allclose(out[mask > 0], want, rtol=1e-4, atol=1e-5)
    assert (out[mask == 0] == 0).all()
    kept = np.asarray(masked_whiten(x_pad, mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask > 0], want + real.mean(), rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_equal_shapes(out, x)


def test_auto_picks_the_matrix_form_for_per_row_lambdas_and_the_scan_otherwise():
    """``auto`` is pure JAX on every backend: the chunked matrix form for scalar / [B] lambdas,
    the associative scan for [B, T] ones, each giving the explicit method's numbers; and an
    unknown method (such as the retired host kernel) is refused by name."""
    rng = np.random.default_rng(3)
    r, v, mask, lengths = make_batch(rng, 4, 40)
    assert adv_lib._pick_method(per_row=True) == "matmul"
    assert adv_lib._pick_method(per_row=False) == "associative"
    per_token = np.broadcast_to(np.linspace(0.8, 1.0, 40, dtype=np.float32), (4, 40))
    for lam, method in ((0.9, "matmul"), (per_token, "associative")):
        kw = dict(gamma=1.0, lambda_actor=lam, lambda_critic=1.0)
        auto = decoupled_gae(r, v, mask, **kw)
        explicit = decoupled_gae(r, v, mask, method=method, **kw)
        for g, w in zip(auto, explicit, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with pytest.raises(ValueError, match=r"method must be one of .*got 'native'"):
        decoupled_gae(r, v, mask, gamma=1.0, lambda_actor=0.9, lambda_critic=1.0, method="native")


def test_group_normalised_advantages_against_a_loop():
    rng = np.random.default_rng(0)
    r = np.zeros((12, 7), np.float32)
    lengths = rng.integers(1, 8, size=12)
    r[np.arange(12), lengths - 1] = rng.choice([-1.0, 1.0], size=12)
    mask = (np.arange(7)[None] < lengths[:, None]).astype(np.float32)
    want = np.zeros_like(r)
    for g in range(3):
        rows = range(4 * g, 4 * g + 4)
        tot = [float(r[i].sum()) for i in rows]
        mu = sum(tot) / 4
        sd = (sum((t - mu) ** 2 for t in tot) / 4) ** 0.5
        for i, t in zip(rows, tot, strict=True):
            want[i] = (t - mu) / (sd + 1e-6) * mask[i]
    got = adv_lib.group_normalised_advantages(r, mask, group_size=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    got_jax = adv_lib.group_normalised_advantages(jnp.asarray(r), jnp.asarray(mask), group_size=4)
    np.testing.assert_allclose(np.asarray(got_jax), want, rtol=1e-5, atol=1e-6)
    # A group that is all right (or all wrong) carries no signal.
    assert not np.any(
        adv_lib.group_normalised_advantages(
            np.ones((4, 2), np.float32), np.ones((4, 2), np.float32), group_size=4
        )
    )
    with pytest.raises(ValueError, match="groups of 5"):
        adv_lib.group_normalised_advantages(r, mask, group_size=5)
