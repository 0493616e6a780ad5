"""Flax Linen decoder for the Llama and Qwen2 families, with an LM head (actor) or a scalar value
head (critic).

Layout conventions (HF names in brackets):
  embed/embedding [V, E]                    (model.embed_tokens.weight)
  layers_i/attn/{q,k,v}_proj/kernel [E, H, D], bias [H, D]   (self_attn.{q,k,v}_proj)
  layers_i/attn/o_proj/kernel [H, D, E]     (self_attn.o_proj.weight)
  layers_i/mlp/{gate,up}_proj/kernel [E, F], down_proj/kernel [F, E]
  layers_i/{input,post_attention}_norm/scale [E], final_norm/scale [E]
  lm_head/kernel [E, V] (absent when embeddings are tied), value_head/{kernel [E, 1], bias [1]}

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``); ``vcppo_jax.sharding`` maps them onto mesh axes.

A KV cache is a dict ``{"layers_i": {"k": [B, Hkv, S, D], "v": [B, Hkv, S, D]}}``. Tokens are
laid out per row from slot 0 (prompt, then response), so a token's position is its cache slot
and attention is causal over slots: query at position p sees slots 0..p. That makes prompts of
different lengths need no separate padding mask: slots past a row's length are never visible
to that row's real tokens.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vcppo_jax.models import attention as attention_lib
from vcppo_jax.models.config import ModelConfig
from vcppo_jax.models.logprobs import chunked_logprobs, mask_unused

Cache = dict[str, dict[str, jax.Array]]
# The residual stream's logical axes: where a pass over several tokens per row (training,
# the prompt pass) is traced under logical-axis rules (the runner's are), the embeddings and
# each layer's output take that layout: rows as the batch, the width by ``activation_embed``
# (replicated by default: the parameters' ``embed`` axis is FSDP's, which the rows already
# use), so FSDP gathers weights rather than activations. A decode step (one token per row) is
# left to the partitioner: there moving the few activations is far cheaper than gathering
# every weight for each token (compiled for 256 H100s, Qwen2.5-32B cut to 8 layers: 55 MB of
# collectives per token unconstrained, at least 2.6 GB of weights gathered constrained).
RESIDUAL = ("batch", "length", "activation_embed")


def constrain_residual(x: jax.Array, decoding: bool) -> jax.Array:
    """``x [B, T, E]`` in the ``RESIDUAL`` layout under the current rules, unless decoding."""
    return x if decoding else nn.with_logical_constraint(x, RESIDUAL)


def _init(axes: tuple[str, ...], scale: float = 0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=scale), axes)


def rope_frequencies(config: ModelConfig) -> jax.Array:
    """Inverse frequencies [D / 2], with Llama 3 scaling when the config asks for it."""
    d = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling_dict
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope scaling type {kind!r} is not supported; supported: 'llama3'")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of the rotary angles, each ``[B, T, 1, D / 2]`` float32. Computed once per
    forward and shared by every layer (inside a fusion XLA would recompute them per element)."""
    angles = positions[..., None].astype(jnp.float32) * rope_frequencies(config)  # [B, T, D/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding, half-split layout (as HF Llama / Qwen2). x: [B, T, H, D]."""
    cos, sin = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis in float32, times a learned ``scale [E]``."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before multiplying by the weight.
        return (scale.astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings -> (``[B, T, E]``, new cache);
    with a cache, k / v are written at ``positions`` and the updated cache is returned."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, rope, cache=None):
        cfg = self.config
        h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        dt, pdt = cfg.jnp_dtype, cfg.jnp_param_dtype

        def proj(name, heads, axis):
            return HeadProjection(heads, d, axis, cfg.qkv_bias, dt, pdt, name=name)(x)

        q = proj("q_proj", h, "heads")  # [B, T, H, D]
        k = proj("k_proj", kvh, "kv_heads")
        v = proj("v_proj", kvh, "kv_heads")
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)

        if cache is not None:
            # Cache layout [B, Hkv, S, D]: attention reads it without a transpose each step.
            rows = jnp.arange(x.shape[0])[:, None]
            k_all = cache["k"].at[rows, :, positions].set(k.astype(cache["k"].dtype))
            v_all = cache["v"].at[rows, :, positions].set(v.astype(cache["v"].dtype))
            new_cache = {"k": k_all, "v": v_all}
            key_pos = jnp.arange(k_all.shape[2])[None, :]  # Slot index = position.
            kv_spec = "bksd"
        else:
            k_all, v_all, new_cache = k, v, None
            key_pos = positions
            kv_spec = "bskd"
        # Causal over positions: query at p sees keys at positions <= p.
        mask = key_pos[:, None, :] <= positions[:, :, None]  # [B, T, S]

        groups = h // kvh
        qg = q.reshape(q.shape[:2] + (kvh, groups, d))
        kind = attention_lib.resolve(cfg.attention, dtype=cfg.dtype, head_dim=d)
        if kind == "cudnn" and cache is not None:
            # A decode step (one query per row, at its slot), or the prompt pass from slot 0:
            # cuDNN reads the cache in place, each row up to its newest slot.
            decoding = x.shape[1] == 1
            out = attention_lib.cudnn_cached(
                jnp.moveaxis(qg, 1, 3),  # [B, Hkv, G, T, D]
                k_all,
                v_all,
                kv_len=positions[:, -1] + 1,
                causal=not decoding,
            )
            out = jnp.moveaxis(out, 3, 1).reshape(q.shape[:2] + (h, d))
            return self._o_proj(out), new_cache
        if kind != "xla" and x.shape[1] > 1:  # Training, or the prompt pass.
            qh = jnp.moveaxis(qg, 1, 3)  # [B, Hkv, G, T, D]
            kh, vh = (a.astype(dt) for a in (k_all, v_all))
            if cache is None:
                kh, vh = jnp.moveaxis(kh, 1, 2), jnp.moveaxis(vh, 1, 2)  # [B, Hkv, S, D]
            if kind == "cudnn" and cache is None:  # Slot = position: the mask is causal.
                out = attention_lib.cudnn(qh, kh, vh)
            elif kind == "splash" and cache is None:
                out = attention_lib.splash(qh, kh, vh, interpret=attention_lib.splash_interpret())
            else:
                k_pos = jnp.broadcast_to(key_pos, (x.shape[0], kh.shape[2]))
                out = attention_lib.blockwise(qh, kh, vh, positions, k_pos)
            out = jnp.moveaxis(out, 3, 1).reshape(q.shape[:2] + (h, d))
            return self._o_proj(out), new_cache
        scores = jnp.einsum(
            f"btkgd,{kv_spec}->bkgts", qg, k_all.astype(dt), preferred_element_type=jnp.float32
        ) / math.sqrt(d)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        if cache is not None and x.shape[1] == 1:
            # One query per row (decode): a broadcast multiply and a sum over slots reads the
            # cache once; XLA's CPU dot for these many tiny matrices is several times slower.
            out = jnp.sum(
                probs[:, :, :, 0, :, None].astype(jnp.float32)
                * v_all[:, :, None].astype(jnp.float32),
                axis=-2,
            )[:, None].astype(dt)  # [B, 1, Hkv, G, D]
        else:
            out = jnp.einsum(f"bkgts,{kv_spec}->btkgd", probs, v_all.astype(dt))
        out = out.reshape(out.shape[:2] + (h, d))
        return self._o_proj(out), new_cache

    def _o_proj(self, out):
        cfg = self.config
        return OutputProjection(cfg.hidden_size, cfg.jnp_dtype, cfg.jnp_param_dtype, name="o_proj")(
            out
        )


class HeadProjection(nn.Module):
    """``[B, T, E] -> [B, T, heads, D]`` with ``kernel [E, heads, D]`` (and ``bias [heads, D]``).
    What ``nn.DenseGeneral`` computes, with the kernel created in its own shape: DenseGeneral
    initialises a flattened ``[E, heads * D]`` kernel and reshapes it, which under logical-axis
    rules constrains the rank-2 value by the rank-3 names and fails."""

    heads: int
    head_dim: int
    heads_axis: str  # Logical name of the heads axis: "heads" or "kv_heads".
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        names = ("embed", self.heads_axis, "head_dim")
        shape = (x.shape[-1], self.heads, self.head_dim)
        kernel = self.param("kernel", _init(names), shape, self.param_dtype)
        contract = (((x.ndim - 1,), (0,)), ((), ()))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), contract)
        if self.use_bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, names[1:])
            bias = self.param("bias", bias_init, shape[1:], self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class OutputProjection(nn.Module):
    """``[B, T, heads, D] -> [B, T, E]`` with ``kernel [heads, D, E]``, no bias (as
    ``HeadProjection``, in place of ``nn.DenseGeneral(axis=(-2, -1))``)."""

    features: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        shape = (*x.shape[-2:], self.features)
        kernel = self.param(
            "kernel", _init(("heads", "head_dim", "embed")), shape, self.param_dtype
        )
        contract = (((x.ndim - 2, x.ndim - 1), (0, 1)), ((), ()))
        return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), contract)


class MLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``: ``[..., E] -> [..., E]``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        f = cfg.intermediate_size
        dense = lambda features, axes, name: nn.Dense(
            features,
            use_bias=False,
            dtype=cfg.jnp_dtype,
            param_dtype=cfg.jnp_param_dtype,
            name=name,
            kernel_init=_init(axes),
        )
        gate = dense(f, ("embed", "mlp"), "gate_proj")(x)
        up = dense(f, ("embed", "mlp"), "up_proj")(x)
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder layer, attention then MLP, each with a residual -> (``[B, T, E]``,
    new cache)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, rope, cache=None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=name)
        attn_out, new_cache = Attention(cfg, name="attn")(
            norm("input_norm")(x), positions, rope, cache
        )
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(norm("post_attention_norm")(x))
        x = constrain_residual(x, decoding=cache is not None and x.shape[1] == 1)
        return x, new_cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Decoder(nn.Module):
    """Backbone: embeddings, blocks, final norm -> hidden states [B, T, E]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, cache: Cache | None = None):
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.jnp_dtype,
            param_dtype=cfg.jnp_param_dtype,
            embedding_init=_init(("vocab", "embed")),
            name="embed",
        )
        decoding = cache is not None and tokens.shape[1] == 1
        table = embed.embedding.astype(cfg.jnp_dtype)
        if not decoding:  # Gathered over the ``embed`` axis's devices, as FSDP gathers any
            # weight for use, so the looked-up rows come out laid out as the tokens' rows.
            table = nn.with_logical_constraint(table, ("vocab", None))
        x = constrain_residual(jnp.take(table, tokens, axis=0), decoding)
        rope = rope_tables(cfg, positions)
        block = Block
        if cfg.remat != "none" and cache is None:
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], static_argnums=())
        new_cache = {} if cache is not None else None
        for i in range(cfg.num_layers):
            name = f"layers_{i}"
            x, layer_cache = block(cfg, name=name)(
                x, positions, rope, None if cache is None else cache[name]
            )
            if cache is not None:
                new_cache[name] = layer_cache
        x = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name="final_norm")(x)
        return x, new_cache, embed


class Transformer(nn.Module):
    """``head="lm"``: the actor, returns hidden states and an ``lm_head`` projection;
    ``head="value"``: the critic, returns values [B, T] (float32)."""

    config: ModelConfig
    head: str = "lm"

    def setup(self):
        cfg = self.config
        self.decoder = Decoder(cfg)
        reads_lm = self.head == "lm" or cfg.value_inputs == "hidden+likelihood"
        if reads_lm and not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head",
                _init(("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size),
                cfg.jnp_param_dtype,
            )
        if self.head == "value":
            self.value_head = nn.Dense(
                1,
                dtype=jnp.float32,
                param_dtype=cfg.jnp_param_dtype,
                name="value_head",
                kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            )
            if cfg.value_inputs == "hidden+likelihood":
                # Weight of the model's own log-likelihood of the token it has just read.
                self.likelihood_weight = self.param(
                    "likelihood_weight",
                    nn.with_logical_partitioning(nn.initializers.zeros, ()),
                    (),
                    jnp.float32,
                )
        elif self.head != "lm":
            raise ValueError(f"head must be 'lm' or 'value'; got {self.head!r}")

    def __call__(self, tokens, positions=None, cache=None):
        """Returns (hidden [B, T, E], new_cache) for the actor, (values [B, T], new_cache) for
        the critic. Logits come from ``logits(hidden)`` so callers can chunk them."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden, new_cache, _ = self.decoder(tokens, positions, cache)
        if self.head == "value":
            v = self.value_head(hidden.astype(jnp.float32))[..., 0]
            if self.config.value_inputs == "hidden+likelihood":
                v = v + self.likelihood_weight * self.read_token_logprobs(hidden, tokens)
            return v, new_cache
        return hidden, new_cache

    def read_token_logprobs(self, hidden, tokens):
        """log p(tokens[:, t] | tokens[:, :t]) under this model's own LM head, at slot t
        (0 at slot 0) -> [B, T] float32: how surprising the token just read was, the extra
        input of a value model with ``value_inputs="hidden+likelihood"``. Logits are formed a
        chunk of positions at a time, as for the actor's log-probs."""
        logp, _ = chunked_logprobs(
            hidden[:, :-1], tokens[:, 1:], self.lm_kernel(), vocab_limit=self.config.vocab_limit
        )
        zero = jnp.zeros((tokens.shape[0], 1), jnp.float32)
        return jnp.concatenate([zero, logp], axis=1)

    def lm_kernel(self):
        """The LM head's [E, V] kernel (the embedding's transpose when tied)."""
        if self.config.tie_word_embeddings:
            embedding = self.decoder.variables["params"]["embed"]["embedding"]
            return nn.meta.unbox(embedding).T
        return self.lm_head

    def logits(self, hidden):
        """[..., E] -> float32 logits [..., V]; ids at or above ``config.vocab_limit`` (when
        set) at the float32 minimum."""
        kernel = self.lm_kernel()
        logits = jnp.einsum(
            "...e,ev->...v",
            hidden,
            kernel.astype(hidden.dtype),
            preferred_element_type=jnp.float32,
        )
        return mask_unused(logits, self.config.vocab_limit)
