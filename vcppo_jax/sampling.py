"""Autoregressive sampling with a KV cache: a jitted prefill, then a ``lax.while_loop`` decode.

Prompts arrive right padded (``prompts [B, P]``, ``prompt_lengths [B]``). Each row's tokens
live in one buffer from slot 0 (prompt, then response), so a token's position is its slot and
the result can be scored by the training forward as it is (``models.token_logprobs`` on
``SampleOutput.tokens``). Rows stop at an EOS id (which is kept, with mask 1) or after
``max_new_tokens``; the loop ends when every row has stopped.

The per-token log-probabilities are those of the distribution actually sampled from (after
temperature, top-k and top-p): PPO's old log-probs. At temperature 1 with no filtering they
equal a re-scoring by the training forward.

``generate`` pads prompt lengths up to buckets so that repeated calls reuse compiled code.

XLA's products on every backend, and XLA's attention unless the model asks for cuDNN's
(``ModelConfig.attention="cudnn"``, which ``auto`` means on a GPU): then the prompt pass and
each decode step read the KV cache through cuDNN's fused kernel (``attention.cudnn_cached``).
A seed samples the same tokens on any host with the same attention, up to the backend's float
summation order.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vcppo_jax.models import ModelConfig, Transformer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings (changing them compiles a new program)."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy.
    top_p: float = 1.0
    top_k: int = 0  # 0 = off.
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    # Ids at or above this are never sampled (0: every id of the model). A model's embedding
    # table is often larger than its tokenizer (rounded up to a multiple of 8 here, padded in
    # HF checkpoints); those ids decode to nothing, so they are masked before any filtering.
    vocab_limit: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0; got {self.top_k}")
        if self.vocab_limit < 0:
            raise ValueError(f"vocab_limit must be >= 0; got {self.vocab_limit}")


@flax.struct.dataclass
class DecodeState:
    """The decode loop's carry: token buffer, KV cache, next-token logits, per-row slot and
    stop flag, and the response so far."""

    tokens: jax.Array  # [B, S] int32: prompt then response, per row from slot 0.
    cache: dict  # Per layer {"k", "v"}: [B, Hkv, S, D].
    next_logits: jax.Array  # [B, V] float32: logits for the token at `cur`.
    cur: jax.Array  # [B] int32: slot of the next token.
    done: jax.Array  # [B] bool.
    step: jax.Array  # [] int32: response tokens produced so far.
    response: jax.Array  # [B, N] int32.
    logprobs: jax.Array  # [B, N] float32.
    mask: jax.Array  # [B, N] bool.
    rng: jax.Array


@flax.struct.dataclass
class SampleOutput:
    """Sampled responses: the whole token buffer, and response-aligned tokens, mask, log-probs
    and lengths."""

    tokens: jax.Array  # [B, P + N]: prompt then response, per row from slot 0.
    prompt_lengths: jax.Array  # [B]
    response_tokens: jax.Array  # [B, N], response-aligned; pad after the end.
    response_mask: jax.Array  # [B, N] float32, 1 on real response tokens (EOS included).
    response_logprobs: jax.Array  # [B, N] float32, log-probs under the sampling distribution.
    response_lengths: jax.Array  # [B]


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus); removed entries become -inf."""
    logits = logits.astype(jnp.float32)
    if params.temperature > 0:
        logits = logits / params.temperature
    neg = jnp.finfo(jnp.float32).min
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, params.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if params.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # Mass strictly before each entry.
        keep = before < params.top_p  # Always keeps the first.
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def _argmax(x: jax.Array) -> jax.Array:
    """First index of the maximum along the last axis. Two plain reductions: on CPU this is
    several times faster than the (value, index) pair reduction behind jnp.argmax."""
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def mask_vocab(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Logits with the ids at or above ``params.vocab_limit`` (when set) at the float32 minimum.
    Gumbel-max sampling and argmax then pick what they would have picked unmasked, unless that
    was a masked id."""
    logits = logits.astype(jnp.float32)
    if 0 < params.vocab_limit < logits.shape[-1]:
        ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        logits = jnp.where(ids < params.vocab_limit, logits, jnp.finfo(jnp.float32).min)
    return logits


def _choose(logits, rng, params: SamplingParams):
    """-> (token [B], log-prob under the sampling distribution [B])."""
    logits = mask_vocab(logits, params)
    if params.temperature == 0:
        logits = logits.astype(jnp.float32)
        token = _argmax(logits)
        logp_all = jax.nn.log_softmax(logits, axis=-1)
    else:
        filtered = filter_logits(logits, params)
        token = jax.random.categorical(rng, filtered, axis=-1)
        logp_all = jax.nn.log_softmax(filtered, axis=-1)
    logp = jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logp


def init_cache(model_config: ModelConfig, batch: int, length: int) -> dict:
    """A zero KV cache ``{"layers_i": {"k", "v"}}``, each ``[batch, Hkv, length, D]`` in the
    compute dtype."""
    shape = (batch, model_config.num_kv_heads, length, model_config.head_size)
    zeros = lambda: jnp.zeros(shape, model_config.jnp_dtype)
    return {f"layers_{i}": {"k": zeros(), "v": zeros()} for i in range(model_config.num_layers)}


@functools.partial(jax.jit, static_argnums=(0, 4))
def prefill(
    model_config: ModelConfig, params, prompts, prompt_lengths, sampling: SamplingParams, rng
):
    """Runs the prompts through the model once, filling the cache -> DecodeState."""
    b, p = prompts.shape
    n = sampling.max_new_tokens
    model = Transformer(model_config, head="lm")
    buffer = jnp.full((b, p + n), sampling.pad_id, jnp.int32)
    buffer = jax.lax.dynamic_update_slice(buffer, prompts.astype(jnp.int32), (0, 0))
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    cache = init_cache(model_config, b, p + n)
    hidden, cache = model.apply({"params": params}, prompts, positions, cache)
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    next_logits = model.apply({"params": params}, last, method=Transformer.logits)
    return DecodeState(
        tokens=buffer,
        cache=cache,
        next_logits=next_logits,
        cur=prompt_lengths.astype(jnp.int32),
        done=jnp.zeros((b,), bool),
        step=jnp.zeros((), jnp.int32),
        response=jnp.full((b, n), sampling.pad_id, jnp.int32),
        logprobs=jnp.zeros((b, n), jnp.float32),
        mask=jnp.zeros((b, n), bool),
        rng=rng,
    )


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=(2,))
def decode(model_config: ModelConfig, params, state: DecodeState, sampling: SamplingParams):
    """Samples until every row hit EOS or max_new_tokens. The state (and its cache) is donated."""
    model = Transformer(model_config, head="lm")
    b, s = state.tokens.shape
    n = sampling.max_new_tokens
    eos = jnp.asarray(sampling.eos_ids or (-1,), jnp.int32)
    rows = jnp.arange(b)
    variables = {"params": params}

    def cond(st: DecodeState):
        return (st.step < n) & ~jnp.all(st.done)

    def body(st: DecodeState):
        token, logp = _choose(st.next_logits, jax.random.fold_in(st.rng, st.step), sampling)
        active = ~st.done
        token = jnp.where(active, token, sampling.pad_id)
        slot = jnp.minimum(st.cur, s - 1)
        tokens = st.tokens.at[rows, slot].set(jnp.where(active, token, st.tokens[rows, slot]))
        response = st.response.at[:, st.step].set(token)
        logprobs = st.logprobs.at[:, st.step].set(jnp.where(active, logp, 0.0))
        mask = st.mask.at[:, st.step].set(active)
        done = st.done | (active & jnp.any(token[:, None] == eos[None, :], axis=-1))
        done = done | (st.step + 1 >= n)
        hidden, cache = model.apply(variables, token[:, None], slot[:, None], st.cache)
        next_logits = model.apply(variables, hidden[:, 0], method=Transformer.logits)
        return st.replace(
            tokens=tokens,
            cache=cache,
            next_logits=next_logits,
            cur=st.cur + active,
            done=done,
            step=st.step + 1,
            response=response,
            logprobs=logprobs,
            mask=mask,
        )

    return jax.lax.while_loop(cond, body, state)


def bucket_length(n: int, minimum: int = 16, step: int = 32) -> int:
    """The padded prompt length: the next power of two >= n (at least ``minimum``) up to
    ``step``, then the next multiple of ``step`` (a 72-token prompt pads to 96, not 128)."""
    if n > step:
        return -(-n // step) * step
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def generate(
    model_config: ModelConfig,
    params,
    prompts,
    prompt_lengths,
    sampling: SamplingParams,
    rng: jax.Array,
) -> SampleOutput:
    """Samples responses for right-padded ``prompts [B, P]`` with ``prompt_lengths [B]``."""
    prompts = np.asarray(prompts)
    lengths = np.asarray(prompt_lengths)
    if prompts.ndim != 2 or lengths.shape != prompts.shape[:1]:
        raise ValueError(
            f"prompts must be [B, P] and prompt_lengths [B]; got {prompts.shape}, {lengths.shape}"
        )
    if (lengths < 1).any() or (lengths > prompts.shape[1]).any():
        raise ValueError(f"prompt_lengths must lie in [1, {prompts.shape[1]}]; got {lengths}")
    if prompts.max(initial=0) >= model_config.vocab_size or prompts.min(initial=0) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {model_config.vocab_size})")
    p = bucket_length(int(lengths.max()))
    padded = np.full((prompts.shape[0], p), sampling.pad_id, np.int32)
    width = min(p, prompts.shape[1])
    padded[:, :width] = prompts[:, :width]
    state = prefill(
        model_config, params, jnp.asarray(padded), jnp.asarray(lengths, jnp.int32), sampling, rng
    )
    state = decode(model_config, params, state, sampling)
    mask = state.mask.astype(jnp.float32)
    return SampleOutput(
        tokens=state.tokens,
        prompt_lengths=jnp.asarray(lengths, jnp.int32),
        response_tokens=state.response,
        response_mask=mask,
        response_logprobs=state.logprobs,
        response_lengths=jnp.sum(mask, axis=1).astype(jnp.int32),
    )


def response_positions(output: SampleOutput) -> jax.Array:
    """Slot in ``output.tokens`` of each response token: ``[B, N]`` (prompt_length + index)."""
    n = output.response_tokens.shape[1]
    return output.prompt_lengths[:, None] + jnp.arange(n)[None, :]
