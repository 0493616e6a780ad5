"""Llama / Qwen2 decoders: the actor (LM head) and the critic (value head).

Parameters are plain pytrees (the Linen ``params`` collection, unboxed). Entry points:

* ``forward(config, params, tokens) -> logits [B, T, V]`` (float32, positions 0..T-1, causal).
* ``token_logprobs(config, params, tokens)``: log-probabilities of the given tokens, computed in
  chunks over the sequence so that ``[B, T, V]`` logits never exist at once.
* ``values(config, params, tokens) -> [B, T]`` for a critic's parameters.
* ``init_params(config, rng, head="lm" | "value")``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vcppo_jax.models.config import ModelConfig
from vcppo_jax.models.logprobs import LOGITS_CHUNK_BYTES, auto_chunk_size, chunked_logprobs
from vcppo_jax.models.transformer import Transformer

__all__ = [
    "ModelConfig",
    "Transformer",
    "forward",
    "init_params",
    "token_logprobs",
    "values",
    "abstract_params",
    "auto_chunk_size",
    "LOGITS_CHUNK_BYTES",
]


def _model(config: ModelConfig, head: str) -> Transformer:
    return Transformer(config, head=head)


def _init_boxed(config: ModelConfig, rng: jax.Array, head: str):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return _model(config, head).init(rng, tokens)["params"]


def init_params(config: ModelConfig, rng: jax.Array, head: str = "lm"):
    """Random parameters (normal(0.02) weights; a zero value head). Made whatever logical-axis
    rules are in force (the runner traces under its own): placing them is the callers'
    business (``sharding``), and a constraint on a host array outside ``jit`` would fail."""
    with nn.logical_axis_rules(()):
        return nn.meta.unbox(_init_boxed(config, rng, head))


def abstract_params(config: ModelConfig, head: str = "lm"):
    """Shapes and logical axis names, without allocating: (ShapeDtypeStruct tree, names tree)."""
    with nn.logical_axis_rules(()):
        init = functools.partial(_init_boxed, config, head=head)
        boxed = jax.eval_shape(init, jax.random.key(0))
        return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


@functools.partial(jax.jit, static_argnums=0)
def forward(config: ModelConfig, params, tokens: jax.Array) -> jax.Array:
    """Logits ``[B, T, V]`` in float32 for ``tokens [B, T]`` at positions 0..T-1 (causal)."""
    model = _model(config, "lm")
    hidden, _ = model.apply({"params": params}, tokens)
    return model.apply({"params": params}, hidden, method=Transformer.logits)


@functools.partial(jax.jit, static_argnums=0)
def values(config: ModelConfig, params, tokens: jax.Array) -> jax.Array:
    """Critic values ``[B, T]`` (float32); ``values[:, t]`` scores ``tokens[:, :t+1]``."""
    out, _ = _model(config, "value").apply({"params": params}, tokens)
    return out


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk_size", "with_entropy"))
def token_logprobs(
    config: ModelConfig,
    params,
    tokens: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
):
    """Log-probabilities of each token given the ones before it.

    Returns ``logp [B, T]`` with ``logp[:, t] = log p(tokens[:, t] | tokens[:, :t])`` for
    ``t >= 1`` and ``logp[:, 0] = 0``; with ``with_entropy``, also the entropy of the
    next-token distribution at each of those positions. Logits are divided by
    ``temperature`` (as the sampler does) and formed ``chunk_size`` positions at a time
    (default: as many as keep one chunk's float32 logits under ``LOGITS_CHUNK_BYTES``). The
    softmax runs over the ids below ``config.vocab_limit`` when it is set.
    """
    model = _model(config, "lm")
    hidden, _ = model.apply({"params": params}, tokens)  # [B, T, E]
    if chunk_size is None:
        chunk_size = auto_chunk_size(tokens.shape[0], config.vocab_size)
    # Position t - 1 predicts token t.
    temperature = jnp.asarray(temperature, jnp.float32)
    kernel = model.apply({"params": params}, method=Transformer.lm_kernel)
    logp, ent = chunked_logprobs(
        hidden[:, :-1],
        tokens[:, 1:],
        kernel,
        temperature,
        chunk_size,
        with_entropy,
        config.vocab_limit,
    )
    zero = jnp.zeros((tokens.shape[0], 1), jnp.float32)
    logp = jnp.concatenate([zero, logp], axis=1)
    if with_entropy:
        return logp, jnp.concatenate([zero, ent], axis=1)
    return logp
