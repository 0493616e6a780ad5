"""Causal grouped-query attention over positions, by three implementations.

Every function takes queries grouped by key head, ``q [B, Hkv, G, T, D]`` (G = query heads per
key head), keys and values ``[B, Hkv, S, D]``, and the positions of queries ``[B, T]`` and keys
``[B, S]`` (int). Query t sees key s when ``k_pos[s] <= q_pos[t]``: causal, and right padding
needs no mask of its own (padded slots lie after every real token of their row). Returns
``[B, Hkv, G, T, D]`` in the queries' dtype; products accumulate in float32.

- ``reference``: the scores ``[B, Hkv, G, T, S]`` materialised, then softmax. Memory O(T S).
- ``blockwise``: online softmax over key blocks of ``block`` keys (a ``lax.scan``), with a
  hand-written backward pass that recomputes each block's probabilities from the saved
  log-sum-exp instead of storing them (as flash attention does). Forward and backward then
  hold O((T + S) D + T x block) per head: linear in the length. Pure JAX: any backend.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
  kernel on NVIDIA GPUs; only for queries and keys at the same positions (training, the
  prompt pass), where the position mask is the causal one.

``IMPLEMENTATIONS`` names the choices of ``ModelConfig.attention``; ``resolve`` turns ``auto``
into the best available on the current backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn")
DEFAULT_BLOCK = 512
_FAR = jnp.iinfo(jnp.int32).max  # Position of padding keys: visible to no query.


def resolve(name: str, backend: str | None = None) -> str:
    """The implementation ``name`` stands for on ``backend`` (default: JAX's): ``auto`` is
    ``cudnn`` on GPUs and ``blockwise`` elsewhere; other names stand for themselves."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r}; expected one of {IMPLEMENTATIONS}")
    if name != "auto":
        return name
    return "cudnn" if (backend or jax.default_backend()) == "gpu" else "blockwise"


def _mask(q_pos, k_pos):
    return k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]  # [B, 1, 1, T, S]


def reference(q, k, v, q_pos, k_pos):
    """Attention with the scores materialised (the definition the others are tested against)."""
    p = jax.nn.softmax(_scores(q, k, q_pos, k_pos), axis=-1)
    p = jnp.where(jnp.isnan(p), 0.0, p)  # A query that sees no key: zeros, as blockwise.
    return jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v).astype(q.dtype)


def blockwise(q, k, v, q_pos, k_pos, block: int = DEFAULT_BLOCK):
    """Attention by key blocks with the memory-linear backward pass (see the module doc)."""
    s_len = k.shape[2]
    block = max(1, min(block, s_len))
    pad = -s_len % block
    if pad:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=_FAR)
    return _blockwise(q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32), block)


def _block(x, j, block):
    return jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=x.ndim - 2)


def _scores(q, k_j, q_pos, kp_j):
    """Masked scaled scores of (a block of) keys -> [B, Hkv, G, T, S] float32 (-inf masked)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k_j, preferred_element_type=jnp.float32) * scale
    return jnp.where(_mask(q_pos, kp_j), s, -jnp.inf)


def _forward(q, k, v, q_pos, k_pos, block):
    n_blocks = k.shape[2] // block
    stats = q.shape[:-1]  # [B, Hkv, G, T]

    def body(carry, j):
        m, denom, acc = carry
        kp_j = jax.lax.dynamic_slice_in_dim(k_pos, j * block, block, axis=1)
        s = _scores(q, _block(k, j, block), q_pos, kp_j)
        m_new = jnp.maximum(m, s.max(axis=-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # No key seen yet: nothing to scale.
        p = jnp.exp(s - shift[..., None])
        corr = jnp.exp(m - shift)
        denom = denom * corr + p.sum(axis=-1)
        pv = jnp.einsum(
            "bkgts,bksd->bkgtd",
            p.astype(v.dtype),
            _block(v, j, block),
            preferred_element_type=jnp.float32,
        )
        return (m_new, denom, acc * corr[..., None] + pv), None

    init = (
        jnp.full(stats, -jnp.inf, jnp.float32),
        jnp.zeros(stats, jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    (m, denom, acc), _ = jax.lax.scan(body, init, jnp.arange(n_blocks))
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    out = jnp.where(seen[..., None], acc / safe[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(safe), jnp.inf)  # exp(s - inf) = 0.
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q, k, v, q_pos, k_pos, block):
    return _forward(q, k, v, q_pos, k_pos, block)[0]


def _blockwise_fwd(q, k, v, q_pos, k_pos, block):
    out, lse = _forward(q, k, v, q_pos, k_pos, block)
    return out, (q, k, v, q_pos, k_pos, out, lse)


def _blockwise_bwd(block, res, d_out):
    q, k, v, q_pos, k_pos, out, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [B, Hkv, G, T]
    n_blocks = k.shape[2] // block

    def body(dq, j):
        k_j, v_j = _block(k, j, block), _block(v, j, block)
        kp_j = jax.lax.dynamic_slice_in_dim(k_pos, j * block, block, axis=1)
        p = jnp.exp(_scores(q, k_j, q_pos, kp_j) - lse[..., None])  # Recomputed, not stored.
        dv_j = jnp.einsum("bkgts,bkgtd->bksd", p, d_out)
        dp = jnp.einsum("bkgtd,bksd->bkgts", d_out, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgts,bksd->bkgtd", ds, k_j, preferred_element_type=jnp.float32)
        dk_j = jnp.einsum("bkgts,bkgtd->bksd", ds, q, preferred_element_type=jnp.float32)
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(n_blocks))
    # [n_blocks, B, Hkv, block, D] -> [B, Hkv, n_blocks * block, D]
    unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(k.shape)
    return (
        dq.astype(q.dtype),
        unblock(dk).astype(k.dtype),
        unblock(dv).astype(v.dtype),
        None,
        None,
    )


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def cudnn(q, k, v):
    """cuDNN's fused causal attention (queries and keys at the same positions, slot = position)."""
    b, kvh, g, t, d = q.shape
    qh = jnp.moveaxis(q.reshape(b, kvh * g, t, d), 2, 1)  # [B, T, H, D]
    kh, vh = jnp.moveaxis(k, 2, 1), jnp.moveaxis(v, 2, 1)  # [B, S, Hkv, D]
    out = jax.nn.dot_product_attention(qh, kh, vh, is_causal=True, implementation="cudnn")
    return jnp.moveaxis(out, 1, 2).reshape(b, kvh, g, t, d)
