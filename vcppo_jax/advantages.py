"""Generalised advantage estimation with separate lambdas for actor and critic.

VC-PPO (Yuan et al. 2025, arXiv 2503.01491, section 4) decouples the GAE lambda of the policy
from that of the value model: the critic regresses on targets built with ``lambda_critic``
(1.0, the Monte Carlo return, so the terminal reward is not decayed on long sequences), while
the actor's advantages use ``lambda_actor`` < 1 for lower variance. Any baseline leaves the
policy gradient unbiased, so the two may differ.

All arrays are ``[B, T]`` over response tokens, right padded. With the TD error

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),     V(s_T) = 0 after the last real token,

the advantage obeys the backward recursion

    A_t = delta_t + gamma * lambda_t * A_{t+1},      A = 0 beyond the last real token.

Every estimator here is a first-order linear recurrence ``y_t = x_t + c_t * y_{t+1}``,
solved with one of interchangeable methods:

* ``"matmul"``: scalar or per-row (``[B]``) coefficients. Time is cut into chunks of ``C``
  tokens; inside a chunk the recurrence is ``x @ M`` with ``M[j, i] = c^(j - i)`` for
  ``j >= i`` (a small triangular matrix). The chunk starts form a recurrence ``C`` times
  shorter with coefficient ``c^C``, solved the same way, and one element-wise pass joins them.
* ``"associative"``: ``lax.associative_scan`` over the affine maps ``y -> x_t + c_t y``
  (log depth), for per-token (``[B, T]``) coefficients; both lambdas in one pass.
* ``"scan"``: the plain reverse ``lax.scan`` over time, kept as a reference.

``"auto"`` uses ``"matmul"`` whenever the lambdas allow it and ``"associative"`` otherwise, on
every backend: pure JAX, so advantages do not depend on the host.
``benchmarks/gae.py`` measures every method against the peers on the machine at hand.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Method = Literal["auto", "matmul", "associative", "scan"]
_METHODS = ("auto", "matmul", "associative", "scan")
_MATMUL_CHUNK = 16  # Chunk length of the "matmul" method (size of the triangular matrix).
_MATMUL_DIRECT = 64  # Up to this length the "matmul" method uses one [T, T] matrix.


def _as_float(x: jax.Array) -> jax.Array:
    """Accumulate in float32 (or float64) whatever the storage dtype is."""
    x = jnp.asarray(x)
    if x.dtype == jnp.float64:
        return x
    return x.astype(jnp.float32)


def _check_lambda(name: str, lam, shape: tuple[int, int]) -> None:
    lam_shape = np.shape(lam)
    if lam_shape not in ((), shape[:1], shape):
        raise ValueError(
            f"{name} must be a scalar, [B] = {shape[:1]} or [B, T] = {shape}; got shape {lam_shape}"
        )
    if isinstance(lam, (int, float)) and not 0.0 <= lam <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {lam}")


def _pick_method(per_row: bool) -> str:
    """Measured in benchmarks/gae.py: the matrix form (matrix units) for scalar / per-row
    lambdas, the log-depth scan for per-token ones. Re-measure on new hardware with
    ``python -m benchmarks.gae`` before trusting it."""
    return "matmul" if per_row else "associative"


# ----------------------------------------------------------------------------------------------
# Linear recurrence solvers: y_t = x_t + c_t * y_{t+1}, y_T = 0, along the last axis.
# ----------------------------------------------------------------------------------------------


def _recurrence_scan(x: jax.Array, c: jax.Array) -> jax.Array:
    """Reference: reverse scan over time, time-major. x, c: [N, T]."""

    def step(y_next, xc):
        x_t, c_t = xc
        y_t = x_t + c_t * y_next
        return y_t, y_t

    _, y = jax.lax.scan(step, jnp.zeros(x.shape[:-1], x.dtype), (x.T, c.T), reverse=True, unroll=8)
    return y.T


def _recurrence_associative(x: jax.Array, c: jax.Array) -> jax.Array:
    """Log-depth scan over the affine maps y -> x_t + c_t * y. x, c: [N, T]."""

    def combine(later, earlier):
        # Elements arrive in reverse time order: `later` holds the map nearer the end.
        c_l, x_l = later
        c_e, x_e = earlier
        return c_e * c_l, x_e + c_e * x_l

    _, y = jax.lax.associative_scan(combine, (c, x), reverse=True, axis=x.ndim - 1)
    return y


def _pad_time(a: jax.Array, chunk: int) -> jax.Array:
    pad = (-a.shape[-1]) % chunk
    if pad == 0:
        return a
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])


def _power_matrix(coef: jax.Array, size: int, dtype) -> jax.Array:
    """M[..., j, i] = coef^(j - i) for j >= i, else 0: (x @ M)_i = sum_{j>=i} coef^(j-i) x_j.

    coef: a scalar or [N] (one matrix per row).
    """
    idx = jnp.arange(size)
    power = idx[:, None] - idx[None, :]
    coef = jnp.asarray(coef)[..., None, None]
    # 0 ** 0 == 1 keeps the diagonal at one when coef == 0.
    return jnp.where(power >= 0, coef ** jnp.maximum(power, 0), 0.0).astype(dtype)


def _chunk_solve(x: jax.Array, coef: jax.Array, size: int) -> jax.Array:
    """x: [N, K, size] -> every chunk solved on its own (zero after the chunk end)."""
    m = _power_matrix(coef, size, x.dtype)
    if m.ndim == 2:  # One matrix for all rows: a single large matrix product.
        return jnp.dot(x, m, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("nkj,nji->nki", x, m, precision=jax.lax.Precision.HIGHEST)


def _recurrence_matmul(x: jax.Array, coef: jax.Array) -> jax.Array:
    """Solves the recurrence for a scalar or per-row ([N]) coefficient with matrix products.

    x: [N, T]. Chunks of ``_MATMUL_CHUNK`` tokens are solved by ``x @ M``; the chunk starts
    form a recurrence of length T / C with coefficient c^C, solved the same way
    (recursively), and one element-wise pass joins the two.
    """
    n, t = x.shape
    dtype = x.dtype
    if t <= _MATMUL_DIRECT:
        return _chunk_solve(x[:, None, :], coef, t)[:, 0, :]
    chunk = _MATMUL_CHUNK
    xp = _pad_time(x, chunk)
    k = xp.shape[1] // chunk
    local = _chunk_solve(xp.reshape(n, k, chunk), coef, chunk)  # [N, K, C]
    # Value at every chunk start, everything after it included.
    starts = _recurrence_matmul(local[:, :, 0], coef**chunk)  # [N, K]
    next_start = jnp.concatenate([starts[:, 1:], jnp.zeros((n, 1), dtype)], axis=1)
    tail_power = (chunk - jnp.arange(chunk)).astype(dtype)
    tail = jnp.asarray(coef)[..., None] ** tail_power  # coef^(C - i): [C] or [N, C]
    # Materialise the small arrays: fused into the element-wise join below, their pads,
    # slices and powers would be recomputed for every element, unvectorised.
    next_start, tail = jax.lax.optimization_barrier((next_start, tail))
    y = local + tail[..., None, :] * next_start[..., None]
    return y.reshape(n, k * chunk)[:, :t]


def _reverse_linear_recurrence(x: jax.Array, c: jax.Array, method: str) -> jax.Array:
    if method == "scan":
        return _recurrence_scan(x, c)
    if method == "associative":
        return _recurrence_associative(x, c)
    raise ValueError(f"unknown recurrence method {method!r}")


# ----------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("method",))
def _decoupled_gae(rewards, values, mask, gamma, lambda_actor, lambda_critic, method):
    r_t = _as_float(rewards)
    dtype = r_t.dtype
    v_t = _as_float(values).astype(dtype)
    m_t = jnp.asarray(mask) > 0
    b, t = r_t.shape
    gamma = jnp.asarray(gamma, dtype)
    # Padding may hold anything (even NaN): select, never multiply. Positions past the last
    # real token hold no state, so their values never bootstrap.
    m_tp1 = jnp.concatenate([m_t[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
    v_tp1 = jnp.where(m_tp1, jnp.concatenate([v_t[:, 1:], jnp.zeros((b, 1), dtype)], axis=1), 0.0)
    delta = jnp.where(m_t, r_t + gamma * v_tp1 - v_t, 0.0)  # [B, T]

    # Per-row coefficients ([B]) keep the matrix formulation; per-token ones need a scan.
    per_row = jnp.ndim(lambda_actor) <= 1 and jnp.ndim(lambda_critic) <= 1
    if method == "matmul" and not per_row:
        raise ValueError("method='matmul' needs scalar or [B] lambdas, not [B, T]")

    def coef(lam):
        lam = _as_float(lam).astype(dtype)
        if method == "matmul":
            return gamma * lam
        if lam.ndim == 1:
            lam = lam[:, None]
        return jnp.broadcast_to(gamma * lam, (b, t))

    if method == "matmul":
        adv = _recurrence_matmul(delta, coef(lambda_actor))
        ret_adv = _recurrence_matmul(delta, coef(lambda_critic))
    else:
        # Both lambdas in one pass: stack them along the batch.
        y = _reverse_linear_recurrence(
            jnp.concatenate([delta, delta], axis=0),
            jnp.concatenate([coef(lambda_actor), coef(lambda_critic)], axis=0),
            method,
        )
        adv, ret_adv = y[:b], y[b:]
    # With right padding delta is 0 from the first padded position on, so the solutions are
    # already 0 there; the select keeps that true for any mask.
    advantages = jnp.where(m_t, adv, 0.0)
    returns = jnp.where(m_t, ret_adv + v_t, 0.0)
    return advantages, returns


def decoupled_gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float | jax.Array,
    lambda_actor: float | jax.Array,
    lambda_critic: float | jax.Array,
    method: Method = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Decoupled GAE: actor advantages with ``lambda_actor``, critic targets with ``lambda_critic``.

    Args:
      rewards: ``[B, T]`` per-token rewards r_t (VC-PPO: the terminal reward on the last real
        token, zero elsewhere). Any float dtype; accumulated in float32.
      values: ``[B, T]``, ``values[b, t] = V(s_t)``; ignored where ``mask`` is 0, and the value
        after the last real token is taken as 0 (terminal).
      mask: ``[B, T]``, 1 on real response tokens, right padded (a row of zeros is allowed).
      gamma: discount, usually 1.0.
      lambda_actor: scalar, ``[B]`` (e.g. ``length_adaptive_lambda``) or ``[B, T]``.
      lambda_critic: scalar, ``[B]`` or ``[B, T]``; 1.0 gives Monte Carlo returns.
      method: recurrence solver, ``"auto"`` chooses by backend (see the module docstring).

    Returns:
      ``(advantages, returns)``, both ``[B, T]`` float32 and 0 where ``mask`` is 0:
      ``advantages = A^{lambda_actor}`` (not whitened) and
      ``returns = A^{lambda_critic} + values``, the critic's regression targets.
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [B, T]; got shape {rewards.shape}")
    shape = rewards.shape
    for name, arr in (("values", values), ("mask", mask)):
        if np.shape(arr) != shape:
            raise ValueError(f"{name} must have the shape of rewards {shape}; got {np.shape(arr)}")
    _check_lambda("lambda_actor", lambda_actor, shape)
    _check_lambda("lambda_critic", lambda_critic, shape)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    if shape[1] == 0:
        empty = jnp.zeros(shape, jnp.float32)
        return empty, empty
    if method == "auto":
        method = _pick_method(np.ndim(lambda_actor) <= 1 and np.ndim(lambda_critic) <= 1)
    return _decoupled_gae(rewards, values, mask, gamma, lambda_actor, lambda_critic, method)


def length_adaptive_lambda(lengths: jax.Array, alpha: float = 0.05) -> jax.Array:
    """VAPO's length-adaptive actor lambda (arXiv 2504.05118, eq. 6).

    ``lambda = 1 - 1 / (alpha * length)``, clipped to ``[0, 1]``, so that
    ``sum_t lambda^t ~ 1 / (1 - lambda) = alpha * length`` grows with the response length.
    A length of 0 gives 0. Returns ``[B]`` float32 for ``[B]`` lengths.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive; got {alpha}")
    lengths = jnp.asarray(lengths, jnp.float32)
    scaled = alpha * lengths
    lam = jnp.where(scaled > 0, 1.0 - 1.0 / jnp.where(scaled > 0, scaled, 1.0), 0.0)
    return jnp.clip(lam, 0.0, 1.0)


def group_normalised_advantages(
    rewards: jax.Array, mask: jax.Array, *, group_size: int, eps: float = 1e-6
) -> jax.Array:
    """GRPO's advantages (no critic): each response's total reward, standardised within its
    group of ``group_size`` consecutive rows (the samples of one prompt; population std), put
    on every real token. ``rewards``, ``mask``: ``[B, T]`` with ``B`` a multiple of the group.
    """
    xp = np if isinstance(rewards, np.ndarray) else jnp  # NumPy in, NumPy out (host side).
    b = rewards.shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(f"{b} rows do not split into groups of {group_size}")
    seq = rewards.sum(1).reshape(-1, group_size)
    norm = (seq - seq.mean(1, keepdims=True)) / (seq.std(1, keepdims=True) + eps)
    return norm.reshape(b, 1).astype(xp.float32) * mask


# The advantage estimators the trainer can use (config: advantage.estimator); "gae" needs a critic.
ESTIMATORS = ("gae", "grpo")


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when there are none)."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(x * mask, axis=axis)
    count = jnp.sum(mask, axis=axis)
    return total / jnp.maximum(count, 1.0)


def masked_whiten(
    x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """Whitens ``x`` with the mean and (unbiased) std over real tokens only.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as some PPO
    implementations do for advantages. Padded positions come back as 0.
    """
    x = _as_float(x)
    mask = mask.astype(x.dtype)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(x * mask) / count
    var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(count - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask
