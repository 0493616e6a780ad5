"""PPO losses against NumPy references, and micro-batch invariance of token-mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcppo_jax import losses


def batch(seed=0, b=6, t=20, lengths=(20, 1, 7, 0, 13, 20)):
    rng = np.random.default_rng(seed)
    mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    old = rng.normal(-2.0, 0.5, size=(b, t)).astype(np.float32)
    new = (old + rng.normal(0.0, 0.3, size=(b, t))).astype(np.float32)
    adv = rng.normal(size=(b, t)).astype(np.float32)
    return new, old, adv, mask


def np_aggregate(x, mask, mode):
    x = np.where(mask > 0, x, 0.0)
    if mode == "token-mean":
        return x.sum() / max(mask.sum(), 1)
    per_seq = x.sum(-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / np.maximum(mask.sum(-1), 1)
    return per_seq.sum() / max((mask.sum(-1) > 0).sum(), 1)  # Rows with a real token.


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_aggregate_matches_numpy(mode):
    new, _, _, mask = batch()
    got = losses.aggregate(jnp.asarray(new), jnp.asarray(mask), mode)
    np.testing.assert_allclose(float(got), np_aggregate(new, mask, mode), rtol=1e-5)


def test_aggregate_unknown_mode():
    new, _, _, mask = batch()
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'sum'"):
        losses.aggregate(jnp.asarray(new), jnp.asarray(mask), "sum")


@pytest.mark.parametrize("mode", losses.AGG_MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_matches_numpy(mode, dual_clip):
    new, old, adv, mask = batch(1)
    eps_low, eps_high = 0.2, 0.28
    loss, m = losses.policy_loss(
        jnp.asarray(new),
        jnp.asarray(old),
        jnp.asarray(adv),
        jnp.asarray(mask),
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        agg_mode=mode,
    )
    ratio = np.exp(new.astype(np.float64) - old)
    per_tok = np.empty_like(ratio)
    for i, j in np.ndindex(ratio.shape):  # Scalar loop: the textbook definition.
        a, r = adv[i, j], ratio[i, j]
        val = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
        if dual_clip is not None and a < 0:
            val = min(val, -a * dual_clip)
        per_tok[i, j] = val
    np.testing.assert_allclose(float(loss), np_aggregate(per_tok, mask, mode), rtol=1e-5)
    real = mask > 0
    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    np.testing.assert_allclose(float(m["clip_fraction_low"]), low[real].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["clip_fraction_high"]), high[real].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["clip_fraction"]), (low | high)[real].mean(), rtol=1e-6)
    k3 = ratio - 1 - np.log(ratio)
    np.testing.assert_allclose(float(m["approx_kl"]), k3[real].mean(), rtol=1e-4)
    assert 0 < float(m["clip_fraction"]) < 1  # The batch exercises both branches.


def test_dual_clip_bounds_negative_advantage_loss():
    adv = -jnp.ones((1, 4))
    logp = jnp.log(jnp.array([[1.0, 2.0, 5.0, 10.0]]))
    loss, m = losses.policy_loss(
        logp, jnp.zeros((1, 4)), adv, jnp.ones((1, 4)), dual_clip=3.0, agg_mode="seq-mean-token-sum"
    )
    # Per token: max(r, clip(r)) then min(., 3) -> 1, 2, 3, 3.
    np.testing.assert_allclose(float(loss), 9.0, rtol=1e-6)
    np.testing.assert_allclose(float(m["dual_clip_fraction"]), 0.5)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        losses.policy_loss(logp, logp, adv, jnp.ones((1, 4)), dual_clip=0.5)


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_microbatch_gradients_add_up_to_full_batch(mode):
    """Normalising by the whole batch's counts makes micro-batching invisible to the gradient."""
    new, old, adv, mask = batch(2, b=8, t=16, lengths=(16, 3, 9, 0, 16, 1, 12, 5))
    new, old, adv, mask = map(jnp.asarray, (new, old, adv, mask))
    tokens, seqs = jnp.sum(mask), jnp.sum(jnp.any(mask > 0, axis=-1))  # 7 rows: one is empty.

    def loss_fn(logp, o, a, m, **kw):
        return losses.policy_loss(logp, o, a, m, eps_low=0.2, eps_high=0.28, agg_mode=mode, **kw)[0]

    full = jax.grad(loss_fn)(new, old, adv, mask)
    parts = []
    for sl in (slice(0, 3), slice(3, 4), slice(4, 8)):  # Uneven splits on purpose.
        parts.append(
            jax.grad(loss_fn)(
                new[sl], old[sl], adv[sl], mask[sl], total_tokens=tokens, total_seqs=seqs
            )
        )
    np.testing.assert_allclose(
        np.asarray(jnp.concatenate(parts)), np.asarray(full), rtol=1e-5, atol=1e-8
    )
    if mode == "token-mean":
        # Without the global count (per-micro-batch normalisation) the gradient differs.
        naive = jnp.concatenate(
            [
                jax.grad(loss_fn)(new[sl], old[sl], adv[sl], mask[sl])
                for sl in (slice(0, 3), slice(3, 4), slice(4, 8))
            ]
        )
        assert not np.allclose(np.asarray(naive), np.asarray(full))


@pytest.mark.parametrize("value_clip", [None, 0.2])
def test_value_loss_matches_numpy(value_clip):
    rng = np.random.default_rng(3)
    _, _, _, mask = batch(3)
    v = rng.normal(size=mask.shape).astype(np.float32)
    v_old = (v + rng.normal(0, 0.5, size=mask.shape)).astype(np.float32)
    ret = rng.normal(size=mask.shape).astype(np.float32)
    loss, m = losses.value_loss(*map(jnp.asarray, (v, v_old, ret, mask)), value_clip=value_clip)
    err = (v - ret) ** 2
    if value_clip is not None:
        err_c = (v_old + np.clip(v - v_old, -value_clip, value_clip) - ret) ** 2
        np.testing.assert_allclose(
            float(m["value_clip_fraction"]), (err_c > err)[mask > 0].mean(), rtol=1e-6
        )
        err = np.maximum(err, err_c)
    np.testing.assert_allclose(float(loss), 0.5 * np_aggregate(err, mask, "token-mean"), rtol=1e-5)
    real = mask > 0
    ev = 1 - np.var(ret[real] - v[real]) / np.var(ret[real])
    np.testing.assert_allclose(float(m["explained_variance"]), ev, rtol=1e-4)


def test_explained_variance_edge_cases():
    mask = jnp.ones((2, 3))
    target = jnp.arange(6.0).reshape(2, 3)
    assert float(losses.explained_variance(target, target, mask)) == pytest.approx(1.0)
    const = jnp.full((2, 3), float(jnp.mean(target)))
    assert float(losses.explained_variance(const, target, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.explained_variance(target, jnp.ones((2, 3)), mask)) == 0.0


def test_entropy_loss_is_the_mean_entropy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = -(p * np.log(p)).sum(-1)
    ent, m = losses.entropy_loss(jnp.asarray(want, jnp.float32), jnp.ones((3, 5)))
    np.testing.assert_allclose(float(ent), want.mean(), rtol=1e-5)


def test_kl_estimators_against_exact_kl():
    """Sampling from pi, k1 and k3 are unbiased for KL(pi || ref); k3 is never negative."""
    rng = np.random.default_rng(5)
    logits_p, logits_q = rng.normal(size=8), rng.normal(size=8)
    logp_all = logits_p - np.log(np.exp(logits_p).sum())
    logq_all = logits_q - np.log(np.exp(logits_q).sum())
    exact = (np.exp(logp_all) * (logp_all - logq_all)).sum()
    samples = rng.choice(8, size=200_000, p=np.exp(logp_all))
    logp, logq = jnp.asarray(logp_all[samples]), jnp.asarray(logq_all[samples])
    for est in ("k1", "k3"):
        kl = losses.kl_penalty(logp, logq, est)
        assert float(jnp.mean(kl)) == pytest.approx(exact, rel=0.05)
    assert float(jnp.min(losses.kl_penalty(logp, logq, "k3"))) >= 0.0
    np.testing.assert_allclose(
        np.asarray(losses.kl_penalty(logp, logq, "k2")),
        0.5 * (logp_all[samples] - logq_all[samples]) ** 2,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        losses.kl_penalty(logp, logq, "k4")
    loss, m = losses.kl_loss(logp[None, :100], logq[None, :100], jnp.ones((1, 100)), estimator="k1")
    np.testing.assert_allclose(float(loss), float(jnp.mean(logp[:100] - logq[:100])), rtol=1e-5)


def test_positive_nll_only_counts_correct_samples():
    new, _, _, mask = batch(6)
    is_pos = jnp.array([1, 0, 1, 1, 0, 0])
    loss, m = losses.positive_nll_loss(jnp.asarray(new), jnp.asarray(mask), is_pos)
    sel = (mask > 0) & (np.asarray(is_pos)[:, None] > 0)
    np.testing.assert_allclose(float(loss), -new[sel].mean(), rtol=1e-5)
    assert float(m["positive_tokens"]) == sel.sum()
    with pytest.raises(ValueError, match="is_positive must be"):
        losses.positive_nll_loss(jnp.asarray(new), jnp.asarray(mask), jnp.ones(3))
