"""Jitted update steps: SFT, reward model, critic (value pretraining and PPO), actor (PPO).

Every step takes a ``TrainState`` and a batch of arrays and returns ``(state, metrics)``; the
state is donated. Sequences are whole buffers ``tokens [B, L]`` (prompt then response from slot
0, as the sampler writes them); per-response-token quantities are ``[B, N]`` arrays aligned
with ``positions [B, N]``, the slot of each response token in the buffer. Hyper-parameters
arrive as arguments; nothing here reads a model_config.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vcppo_jax import losses, models
from vcppo_jax.models import ModelConfig
from vcppo_jax.train_state import TrainState


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, L], positions [B, N] -> x at those slots [B, N] (clipped into range)."""
    positions = jnp.clip(positions, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, positions, axis=1)


def response_logprobs(model_config, params, tokens, positions, temperature=1.0, with_entropy=False):
    """log p(response token | everything before it) at ``positions`` -> [B, N] (and entropy)."""
    out = models.token_logprobs(
        model_config, params, tokens, temperature=temperature, with_entropy=with_entropy
    )
    if with_entropy:
        logp, ent = out
        return gather_positions(logp, positions), gather_positions(ent, positions)
    return gather_positions(out, positions)


def response_values(model_config, params, tokens, positions):
    """V(s_t) for each response token t: the critic's output on the prefix before it, i.e. at
    slot ``position - 1``. -> [B, N] float32."""
    model_params = {k: p for k, p in params.items() if k != "position_offset"}
    v = gather_positions(models.values(model_config, model_params, tokens), positions - 1)
    if "position_offset" in params:  # critic.init_offset_profile="linear": per response token.
        v = v + params["position_offset"][None, : v.shape[1]]
    return v


# ----------------------------------------------------------------------------------------------
# Supervised fine-tuning of the policy.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def sft_step(model_config: ModelConfig, state: TrainState, tokens, positions, mask):
    """Cross-entropy on the response tokens (token mean over the batch)."""

    def loss_fn(params):
        logp = response_logprobs(model_config, params, tokens, positions)
        return losses.aggregate(-logp, mask, "token-mean")

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state, gnorm = state.apply_gradients(grads)
    return state, {"sft/loss": loss, "sft/grad_norm": gnorm}


# ----------------------------------------------------------------------------------------------
# Reward model: a value-head model scored only at the last response token (EOS).
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def reward_model_step(
    model_config: ModelConfig, state: TrainState, tokens, last_positions, targets
):
    """MSE of the score at each response's last token against its +1 / -1 outcome.

    last_positions [B]: slot of the last response token; targets [B] float32.
    """

    def loss_fn(params):
        v = models.values(model_config, params, tokens)
        score = jnp.take_along_axis(v, last_positions[:, None], axis=1)[:, 0]
        loss = 0.5 * jnp.mean(jnp.square(score - targets))
        acc = jnp.mean((jnp.sign(score) == jnp.sign(targets)).astype(jnp.float32))
        return loss, acc

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, gnorm = state.apply_gradients(grads)
    return state, {"rm/loss": loss, "rm/accuracy": acc, "rm/grad_norm": gnorm}


# ----------------------------------------------------------------------------------------------
# Critic and actor (PPO; the critic step also serves value pretraining).
# ----------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit, static_argnums=0, static_argnames=("value_clip", "agg_mode"), donate_argnums=1
)
def critic_step(
    model_config: ModelConfig,
    state: TrainState,
    tokens,
    positions,
    mask,
    returns,
    old_values,
    *,
    value_clip: float | None = None,
    agg_mode: str = "token-mean",
):
    def loss_fn(params):
        v = response_values(model_config, params, tokens, positions)
        return losses.value_loss(
            v, old_values, returns, mask, value_clip=value_clip, agg_mode=agg_mode
        )

    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, gnorm = state.apply_gradients(grads)
    out = {f"critic/{k}": v for k, v in m.items()}
    out["critic/grad_norm"] = gnorm
    return state, out


@functools.partial(
    jax.jit,
    static_argnums=0,
    static_argnames=("eps_low", "eps_high", "dual_clip", "agg_mode", "kl_estimator"),
    donate_argnums=1,
)
def actor_step(
    model_config: ModelConfig,
    state: TrainState,
    tokens,
    positions,
    mask,
    old_logp,
    advantages,
    ref_logp,
    is_positive,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    agg_mode: str,
    entropy_coef: float,
    kl_coef: float,
    kl_estimator: str,
    positive_nll_coef: float,
    temperature: float = 1.0,
):
    def loss_fn(params):
        logp, ent = response_logprobs(
            model_config, params, tokens, positions, temperature, with_entropy=True
        )
        loss, m = losses.policy_loss(
            logp,
            old_logp,
            advantages,
            mask,
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            agg_mode=agg_mode,
        )
        ent_loss, em = losses.entropy_loss(ent, mask, agg_mode=agg_mode)
        kl, km = losses.kl_loss(logp, ref_logp, mask, estimator=kl_estimator, agg_mode=agg_mode)
        nll, nm = losses.positive_nll_loss(logp, mask, is_positive)
        total = loss - entropy_coef * ent_loss + kl_coef * kl + positive_nll_coef * nll
        return total, {**m, **em, **km, **nm, "loss": total}

    (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, gnorm = state.apply_gradients(grads)
    out = {f"actor/{k}": v for k, v in m.items()}
    out["actor/grad_norm"] = gnorm
    return state, out


@functools.partial(jax.jit, static_argnums=0)
def score_rollout(model_config: ModelConfig, params, tokens, positions, temperature=1.0):
    """Trainer-side log-probs of the sampled tokens (no gradient)."""
    return response_logprobs(model_config, params, tokens, positions, temperature)


@functools.partial(jax.jit, static_argnums=0)
def critic_values(model_config: ModelConfig, params, tokens, positions):
    return response_values(model_config, params, tokens, positions)
