"""Jitted update steps: SFT, reward model, critic (value pretraining and PPO), actor (PPO).

Every step takes a ``TrainState`` and a batch of arrays and returns ``(state, metrics)``; the
state is donated. Sequences are whole buffers ``tokens [B, L]`` (prompt then response from slot
0, as the sampler writes them); per-response-token quantities are ``[B, N]`` arrays aligned
with ``positions [B, N]``, the slot of each response token in the buffer. Hyper-parameters
arrive as arguments; nothing here reads a model_config.
"""

from __future__ import annotations

import dataclasses
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


@functools.partial(jax.jit, static_argnums=0)
def reward_scores(model_config: ModelConfig, params, tokens, last_positions):
    """The reward model's score of each sequence at its last response token -> [B]."""
    v = models.values(model_config, params, tokens)
    return jnp.take_along_axis(v, last_positions[:, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnums=0)
def reward_token_scores(model_config: ModelConfig, params, tokens, positions):
    """The reward model's score at every response token's own slot (after reading that token)
    -> [B, N]; ``reward_model.score`` says how a response's score is read from them."""
    return gather_positions(models.values(model_config, params, tokens), positions)


@functools.partial(jax.jit, static_argnums=0, static_argnames="on_min", donate_argnums=1)
def reward_model_step(
    model_config: ModelConfig,
    state: TrainState,
    tokens,
    last_positions,
    targets,
    positions=None,
    mask=None,
    token_targets=None,
    on_min: bool = False,
):
    """MSE of the score against each response's +1 / -1 outcome: at its last token, or (given
    ``positions`` and ``mask``, ``reward_model.loss_on='every_token'``) the mean over every
    response token's slot, each regressed on the outcome (a token-level verifier objective),
    or on its own target in ``token_targets`` (``loss_on="process"``; ``"first_slip"`` is the
    same with ``mask`` 0 after the slip).

    last_positions [B]: slot of the last response token; targets [B] float32; positions /
    mask / token_targets [B, N]: every response token's slot, 1 on real tokens, the target of
    each. With ``on_min`` (``loss_on="min"``) the lowest score over the response's tokens
    (given ``positions`` and ``mask``) is regressed on the outcome instead, the way a
    ``score="min"`` reward model is read. Accuracy is of the score the loss is on (the last
    token's, or the lowest) against ``targets``.
    """

    def loss_fn(params):
        v = models.values(model_config, params, tokens)
        score = jnp.take_along_axis(v, last_positions[:, None], axis=1)[:, 0]
        if on_min:  # The lowest score over the response, as score="min" reads it.
            score = jnp.min(jnp.where(mask > 0, gather_positions(v, positions), jnp.inf), axis=1)
        if on_min or positions is None:
            loss = 0.5 * jnp.mean(jnp.square(score - targets))
        else:
            want = targets[:, None] if token_targets is None else token_targets
            err = jnp.square(gather_positions(v, positions) - want)
            loss = 0.5 * jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)
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
    """One critic update: regress the values at ``positions`` on ``returns`` (``[B, N]``),
    clipped around the rollout's ``old_values`` when ``value_clip`` is set."""

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


@dataclasses.dataclass(frozen=True)
class ActorSettings:
    """The PPO actor loss's settings (``ppo.*`` in the experiment config), checked when made.

    ``eps_low`` / ``eps_high``: the clip range of the ratio (DAPO clip-higher: 0.2 / 0.28);
    ``dual_clip``: a lower bound ``c`` on negative-advantage terms (None = off); ``agg_mode``: how
    token losses are averaged (``losses.AGG_MODES``); the coefficients of the entropy bonus, the
    KL-to-reference penalty (``kl_estimator`` in ``losses.KL_ESTIMATORS``) and VAPO's NLL on
    positive samples; ``temperature``: the sampling temperature the log-probs are taken at."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    agg_mode: str = "token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    positive_nll_coef: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        problems = []
        if not 0.0 < self.eps_low < 1.0:
            problems.append(f"eps_low={self.eps_low!r}: expected a number in (0, 1)")
        if not self.eps_high >= self.eps_low:
            problems.append(f"eps_high={self.eps_high!r}: must be >= eps_low={self.eps_low!r}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            problems.append(f"dual_clip={self.dual_clip!r}: expected a number > 1 or None")
        if self.agg_mode not in losses.AGG_MODES:
            problems.append(f"agg_mode={self.agg_mode!r}: expected one of {losses.AGG_MODES}")
        if self.kl_estimator not in losses.KL_ESTIMATORS:
            problems.append(
                f"kl_estimator={self.kl_estimator!r}: expected one of {losses.KL_ESTIMATORS}"
            )
        for name in ("entropy_coef", "kl_coef", "positive_nll_coef"):
            if not getattr(self, name) >= 0.0:
                problems.append(f"{name}={getattr(self, name)!r}: expected a number >= 0")
        if not self.temperature > 0.0:
            problems.append(f"temperature={self.temperature!r}: expected a number > 0")
        if problems:
            raise ValueError("ActorSettings: " + "; ".join(problems))


@functools.partial(jax.jit, static_argnums=(0, 9), donate_argnums=1)
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
    settings: ActorSettings,
):
    """One PPO actor update: the clipped surrogate on ``advantages`` (``[B, N]``) against the
    rollout's ``old_logp``, with the entropy, KL-to-``ref_logp`` and positive-sample NLL terms
    that ``settings`` switches on (``is_positive [B]`` marks correct samples)."""
    s = settings

    def loss_fn(params):
        logp, ent = response_logprobs(
            model_config, params, tokens, positions, s.temperature, with_entropy=True
        )
        loss, m = losses.policy_loss(
            logp,
            old_logp,
            advantages,
            mask,
            eps_low=s.eps_low,
            eps_high=s.eps_high,
            dual_clip=s.dual_clip,
            agg_mode=s.agg_mode,
        )
        ent_loss, em = losses.entropy_loss(ent, mask, agg_mode=s.agg_mode)
        kl, km = losses.kl_loss(logp, ref_logp, mask, estimator=s.kl_estimator, agg_mode=s.agg_mode)
        nll, nm = losses.positive_nll_loss(logp, mask, is_positive)
        total = loss - s.entropy_coef * ent_loss + s.kl_coef * kl + s.positive_nll_coef * nll
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
    """The critic's values V(s_t) of the states before each response token -> [B, N]."""
    return response_values(model_config, params, tokens, positions)
