"""Log-probabilities of given tokens from hidden states and an LM head kernel, a chunk of
positions at a time, so that ``[B, T, V]`` logits never exist at once (forward or backward).

Shared by the actor's ``token_logprobs`` and by a value model that reads its own likelihood
(``value_inputs="hidden+likelihood"``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vcppo_jax import sharding

# One chunk's float32 logits stay under this many bytes by default.
LOGITS_CHUNK_BYTES = 256 * 2**20


def auto_chunk_size(batch: int, vocab: int, budget: int = LOGITS_CHUNK_BYTES) -> int:
    """Largest power of two (>= 16) of positions whose [batch, chunk, vocab] float32 logits fit
    in ``budget`` bytes. Under a mesh and logical-axis rules (as the runner traces), ``batch``
    and ``vocab`` count what one device holds of them (``per_device``): the budget is each
    device's."""
    fit = max(1, budget // (4 * per_device(batch, "batch") * per_device(vocab, "vocab")))
    return max(16, 1 << (fit.bit_length() - 1))


def per_device(n: int, name: str) -> int:
    """Of ``n`` entries along the logical axis ``name``, those one device holds: under a mesh
    (``jax.set_mesh``) and logical-axis rules (``nn.logical_axis_rules``), ``n`` divided by
    the sizes of the mesh axes the rules give ``name``, each that divides it; else ``n``."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return n
    axes = sharding.dividing_axes(n, sharding.rule_axes(name, rules), mesh.shape)
    return n // math.prod(mesh.shape[a] for a in axes)


def mask_unused(logits, vocab_limit: int):
    """``logits [..., V]`` with the ids at or above ``vocab_limit`` at the float32 minimum, so
    a softmax gives them no mass and no gradient (``vocab_limit`` 0 or >= V: unchanged)."""
    if not 0 < vocab_limit < logits.shape[-1]:
        return logits
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids < vocab_limit, logits, jnp.finfo(jnp.float32).min)


def chunked_logprobs(
    hidden,
    targets,
    kernel,
    temperature=1.0,
    chunk_size=None,
    with_entropy=False,
    vocab_limit: int = 0,
):
    """hidden [B, T, E], targets [B, T], kernel [E, V] -> (log p(targets) [B, T], entropy
    [B, T]) in float32, with logits ``hidden @ kernel / temperature``; entropy is zeros unless
    ``with_entropy``. With ``vocab_limit`` > 0 the softmax runs over the ids below it only
    (``mask_unused``): a target at or above it gets log p = float32 min. ``chunk_size``
    positions at a time (default ``auto_chunk_size``); the backward pass recomputes each
    chunk's logits instead of storing them."""
    b, t, e = hidden.shape
    if chunk_size is None:
        chunk_size = auto_chunk_size(b, kernel.shape[-1])
    if t == 0:  # A one-token sequence (as at initialisation) predicts nothing.
        empty = jnp.zeros((b, 0), jnp.float32)
        return empty, empty
    chunk = min(chunk_size, t)
    pad = (-t) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk
    h_chunks = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)  # [N, B, C, E]
    t_chunks = targets.reshape(b, n, chunk).swapaxes(0, 1)
    # Gathered over the devices of its ``embed`` axis once for all chunks, under logical-axis
    # rules (FSDP's layout), instead of once per chunk, forward and backward.
    kernel = nn.with_logical_constraint(kernel.astype(hidden.dtype), (None, "vocab"))

    @jax.checkpoint
    def one(h, tgt):
        logits = jnp.einsum("bce,ev->bcv", h, kernel, preferred_element_type=jnp.float32)
        logits = mask_unused(logits / temperature, vocab_limit)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        logp = picked - logz
        if not with_entropy:
            return logp, jnp.zeros_like(logp)
        probs = jnp.exp(logits - logz[..., None])
        return logp, logz - jnp.sum(probs * logits, axis=-1)

    logp, ent = jax.lax.map(lambda xs: one(*xs), (h_chunks, t_chunks))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return unchunk(logp), unchunk(ent)
