"""PPO losses for token-level RL of language models.

Every loss takes ``[B, T]`` per-token arrays and a right-padded ``mask`` and returns
``(loss, metrics)``: a scalar to differentiate and a dict of scalar diagnostics. Per-token
terms are reduced with ``aggregate``, whose modes follow the conventions of the long-CoT RL
literature:

* ``"token-mean"``: sum over every real token of the batch / number of real tokens. Pass
  ``total_tokens`` (the count over the *whole* batch) when a batch is split into
  micro-batches: the summed micro-batch gradients then equal the full-batch gradient (DAPO,
  arXiv 2503.14476, section 3.3; VAPO's token-level loss).
* ``"seq-mean-token-mean"``: mean over sequences of each sequence's token mean (the original
  GRPO / PPO-for-LLM convention; long responses weigh less per token).
* ``"seq-mean-token-sum"``: mean over sequences of each sequence's token sum.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")

Metrics = dict[str, jax.Array]


def _check(mask: jax.Array, *arrays: jax.Array) -> None:
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, T]; got shape {mask.shape}")
    for a in arrays:
        if a.shape != mask.shape:
            raise ValueError(f"expected [B, T] = {mask.shape} like the mask; got {a.shape}")


def aggregate(
    x: jax.Array,
    mask: jax.Array,
    mode: AggMode = "token-mean",
    *,
    total_tokens: jax.Array | float | None = None,
    total_seqs: jax.Array | float | None = None,
) -> jax.Array:
    """Reduces a ``[B, T]`` per-token quantity to a scalar (see the module docstring).

    Args:
      x: ``[B, T]`` per-token values.
      mask: ``[B, T]``, 1 on real tokens.
      mode: one of ``AGG_MODES``.
      total_tokens: denominator of ``token-mean``; default the real tokens in ``mask``.
        Give the count over the whole batch when ``x`` is one micro-batch of it.
      total_seqs: denominator of the ``seq-mean-*`` modes; default the rows with a real
        token (a row masked whole, e.g. a group dynamic sampling dropped, is not a sequence).
    """
    _check(mask, x)
    mask = mask.astype(jnp.float32)
    x = jnp.where(mask > 0, x.astype(jnp.float32), 0.0)
    if mode == "token-mean":
        denom = jnp.sum(mask) if total_tokens is None else jnp.asarray(total_tokens, jnp.float32)
        return jnp.sum(x) / jnp.maximum(denom, 1.0)
    seqs = jnp.sum(jnp.any(mask > 0, axis=-1)) if total_seqs is None else total_seqs
    seqs = jnp.maximum(jnp.asarray(seqs, jnp.float32), 1.0)
    per_seq = jnp.sum(x, axis=-1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")
    return jnp.sum(per_seq) / seqs


def _token_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Metric helper: mean over real tokens of this (micro-)batch."""
    return aggregate(x, mask, "token-mean")


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    agg_mode: AggMode = "token-mean",
    total_tokens: jax.Array | float | None = None,
    total_seqs: jax.Array | float | None = None,
) -> tuple[jax.Array, Metrics]:
    """PPO clipped surrogate with clip-higher and optional dual clip.

    Per token, with ``rho = exp(logp - old_logp)``:

        L = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high))      (PPO; DAPO clip-higher)
        L = min(L, -A * dual_clip)   where A < 0                          (dual clip, c > 1)

    Metrics: ``clip_fraction`` (tokens where the clipped branch is active), its ``_low`` part
    (rho < 1 - eps_low, A < 0) and ``_high`` part (rho > 1 + eps_high, A > 0),
    ``dual_clip_fraction``, ``approx_kl`` (k3 estimate of KL(old || new)), ``ratio_mean``,
    ``ratio_max`` and ``pg_loss``. Fractions are over the real tokens given.
    """
    _check(mask, logp, old_logp, advantages)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None); got {dual_clip}")
    logp = logp.astype(jnp.float32)
    old_logp = old_logp.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = jnp.maximum(loss1, loss2)
    clipped_low = (ratio < 1.0 - eps_low) & (adv < 0)
    clipped_high = (ratio > 1.0 + eps_high) & (adv > 0)
    metrics = {}
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual = (adv < 0) & (per_token > bound)
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, bound), per_token)
        metrics["dual_clip_fraction"] = _token_mean(dual.astype(jnp.float32), mask)
    loss = aggregate(per_token, mask, agg_mode, total_tokens=total_tokens, total_seqs=total_seqs)
    f32 = lambda b: b.astype(jnp.float32)
    metrics.update(
        pg_loss=loss,
        clip_fraction=_token_mean(f32(clipped_low | clipped_high), mask),
        clip_fraction_low=_token_mean(f32(clipped_low), mask),
        clip_fraction_high=_token_mean(f32(clipped_high), mask),
        approx_kl=_token_mean(kl_penalty(old_logp, logp, "k3"), mask),
        ratio_mean=_token_mean(ratio, mask),
        ratio_max=jnp.max(jnp.where(mask > 0, ratio, 0.0)),
    )
    return loss, metrics


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    value_clip: float | None = None,
    agg_mode: AggMode = "token-mean",
    total_tokens: jax.Array | float | None = None,
    total_seqs: jax.Array | float | None = None,
) -> tuple[jax.Array, Metrics]:
    """Squared-error critic loss, optionally clipped around the rollout values.

        L = 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)

    (without ``value_clip``: ``0.5 * (V - R)^2``). Metrics: ``value_loss``,
    ``value_clip_fraction`` (tokens where the clipped term is the larger), ``value_mean``,
    ``return_mean`` and ``explained_variance`` of the returns by the new values.
    """
    _check(mask, values, old_values, returns)
    v = values.astype(jnp.float32)
    v_old = old_values.astype(jnp.float32)
    ret = returns.astype(jnp.float32)
    err = jnp.square(v - ret)
    metrics = {}
    if value_clip is not None:
        v_clipped = v_old + jnp.clip(v - v_old, -value_clip, value_clip)
        err_clipped = jnp.square(v_clipped - ret)
        metrics["value_clip_fraction"] = _token_mean((err_clipped > err).astype(jnp.float32), mask)
        err = jnp.maximum(err, err_clipped)
    loss = 0.5 * aggregate(err, mask, agg_mode, total_tokens=total_tokens, total_seqs=total_seqs)
    metrics.update(
        value_loss=loss,
        value_mean=_token_mean(v, mask),
        return_mean=_token_mean(ret, mask),
        explained_variance=explained_variance(v, ret, mask),
    )
    return loss, metrics


def explained_variance(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """``1 - Var[target - pred] / Var[target]`` over real tokens (1 is perfect, 0 is a constant
    predictor, negative is worse than a constant). Returns 0 when the target has no variance."""
    _check(mask, pred, target)
    m = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1.0)

    def var(x):
        mean = jnp.sum(x * m) / count
        return jnp.sum(jnp.square(x - mean) * m) / count

    target = jnp.where(m > 0, target.astype(jnp.float32), 0.0)
    pred = jnp.where(m > 0, pred.astype(jnp.float32), 0.0)
    var_t = var(target)
    # Targets that are constant up to float rounding have no variance to explain.
    has_var = var_t > 1e-8 * (1.0 + jnp.square(jnp.sum(target * m) / count))
    return jnp.where(has_var, 1.0 - var(target - pred) / jnp.where(has_var, var_t, 1.0), 0.0)


def entropy_loss(
    entropy: jax.Array,
    mask: jax.Array,
    *,
    agg_mode: AggMode = "token-mean",
    total_tokens: jax.Array | float | None = None,
    total_seqs: jax.Array | float | None = None,
) -> tuple[jax.Array, Metrics]:
    """Aggregated per-token entropy (add ``-coef * entropy`` to the actor loss for a bonus)."""
    ent = aggregate(entropy, mask, agg_mode, total_tokens=total_tokens, total_seqs=total_seqs)
    return ent, {"entropy": _token_mean(entropy, mask)}


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL
    divergence", 2020), with ``log_r = ref_logp - logp``:

    * ``k1 = -log_r`` (unbiased, high variance, can be negative),
    * ``k2 = 0.5 * log_r^2`` (biased, low variance),
    * ``k3 = exp(log_r) - 1 - log_r`` (unbiased, non-negative).
    """
    log_r = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    if estimator == "k3":
        # Clamp before exp so a far-off reference cannot produce inf.
        log_r = jnp.clip(log_r, -20.0, 20.0)
        return jnp.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_loss(
    logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    *,
    estimator: str = "k3",
    agg_mode: AggMode = "token-mean",
    total_tokens: jax.Array | float | None = None,
    total_seqs: jax.Array | float | None = None,
) -> tuple[jax.Array, Metrics]:
    """KL to a reference policy as a loss term, aggregated like the policy loss."""
    _check(mask, logp, ref_logp)
    kl = kl_penalty(logp, ref_logp, estimator)
    loss = aggregate(kl, mask, agg_mode, total_tokens=total_tokens, total_seqs=total_seqs)
    return loss, {"kl": _token_mean(kl, mask)}


def positive_nll_loss(
    logp: jax.Array,
    mask: jax.Array,
    is_positive: jax.Array,
    *,
    total_tokens: jax.Array | float | None = None,
) -> tuple[jax.Array, Metrics]:
    """VAPO's positive-example LM loss (arXiv 2504.05118, section 5): the mean negative
    log-likelihood over the tokens of correct responses only (``is_positive`` is ``[B]``).

    ``total_tokens`` is the number of tokens of positive samples in the whole batch (default:
    in this batch), so that micro-batch gradients add up. Weight it with ``mu`` (0.1 in VAPO).
    """
    _check(mask, logp)
    if is_positive.shape != mask.shape[:1]:
        raise ValueError(f"is_positive must be [B] = {mask.shape[:1]}; got {is_positive.shape}")
    pos_mask = mask.astype(jnp.float32) * is_positive.astype(jnp.float32)[:, None]
    loss = aggregate(-logp, pos_mask, "token-mean", total_tokens=total_tokens)
    return loss, {"positive_nll": loss, "positive_tokens": jnp.sum(pos_mask)}
