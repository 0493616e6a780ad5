"""PPO (the paper's baseline and VC-PPO alike): sample, score, estimate advantages, update.

``step`` is the stage's step; its parts are separate functions: ``score`` (the rollout's
log-probs under the policy and the reference), ``estimate_advantages`` (decoupled GAE or GRPO,
with the critic's and the mechanism's metrics) and ``update`` (the epochs of critic and actor
minibatch updates). ``mechanism_metrics`` measures the paper's collapse condition on a batch.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from vcppo_jax import advantages as adv_lib
from vcppo_jax import rollout, updates
from vcppo_jax.stages import Context, mean_metrics
from vcppo_jax.train_state import ModelStates


@dataclasses.dataclass(frozen=True)
class Settings:
    """PPO's config fields (``ppo.*``, ``gae.*``, ``advantage.estimator`` and the rollout's
    group settings); ``actor`` is the actor loss's own, checked, settings."""

    actor: updates.ActorSettings
    estimator: str = "gae"  # "gae" or "grpo" (advantages.ESTIMATORS).
    gamma: float = 1.0
    lambda_actor: float = 0.95
    lambda_critic: float = 1.0
    length_adaptive_alpha: float | None = None  # VAPO; None = a fixed lambda_actor.
    whiten_advantages: bool = True
    epochs: int = 1
    value_clip: float | None = None
    dynamic_sampling: bool = False
    samples_per_prompt: int = 1


@dataclasses.dataclass
class Advantages:
    """One batch's advantages (whitened if asked) with what produced them."""

    advantages: jax.Array  # [B, N]
    values: jax.Array | None  # The critic's values (None with GRPO).
    returns: jax.Array | None  # The critic's targets (None with GRPO).
    metrics: dict
    # At PPO step 0: value / advantage / Monte Carlo return by position (host arrays).
    profile: tuple[np.ndarray, ...] | None = None


FIRST_TOKENS = 5  # "First tokens" in the mechanism metrics: the length of a direct answer.


def mechanism_metrics(
    adv: np.ndarray,
    values: np.ndarray,
    rewards_: np.ndarray,
    mask: np.ndarray,
    lengths: np.ndarray,
    direct: np.ndarray,
) -> dict[str, float]:
    """The collapse condition of one PPO batch (host arrays, ``[B, T]`` response-aligned,
    advantages before whitening).

    With lambda < 1 a short answer's first token receives about lambda^T (R_short - V) of its
    terminal signal and a long answer's almost none, so early stopping pays only while the
    critic's value on unfinished prefixes lies below the mean reward of short answers:
    ``collapse_margin = reward_short - value_prefix_short`` > 0 pushes the policy towards
    short answers. Also the first tokens' advantage by route and by length quartile.
    """
    out: dict[str, float] = {}
    seq_reward = rewards_.sum(1)
    k = min(FIRST_TOKENS, adv.shape[1])
    first = mask[:, :k]
    adv_first = (adv[:, :k] * first).sum(1) / np.maximum(first.sum(1), 1)  # [B]
    val_prefix = (values * mask).sum(1) / np.maximum(mask.sum(1), 1)  # [B] mean over states
    val_first = (values[:, :k] * first).sum(1) / np.maximum(first.sum(1), 1)
    out["mechanism/value_first_tokens"] = float(val_first.mean())
    for route, sel in (("short", direct), ("long", ~direct)):
        if sel.any():
            out[f"mechanism/reward_{route}"] = float(seq_reward[sel].mean())
            out[f"mechanism/value_prefix_{route}"] = float(val_prefix[sel].mean())
            out[f"mechanism/advantage_first_tokens_{route}"] = float(adv_first[sel].mean())
    if direct.any():
        out["mechanism/collapse_margin"] = (
            out["mechanism/reward_short"] - out["mechanism/value_prefix_short"]
        )
    # Quartiles of response length within the batch (q1 = shortest quarter).
    order = np.argsort(lengths, kind="stable")
    for q, idx in enumerate(np.array_split(order, 4), start=1):
        if len(idx):
            out[f"mechanism/advantage_first_tokens_q{q}"] = float(adv_first[idx].mean())
            out[f"mechanism/length_q{q}"] = float(np.mean(lengths[idx]))
    return out


def score(
    ctx: Context, states: ModelStates, batch: rollout.Batch, mask, settings: Settings
) -> tuple[jax.Array, jax.Array, dict]:
    """Trainer-side log-probs of the sampled tokens under the policy (PPO's old log-probs) and,
    when the KL term is on, the reference; with the largest gap to the sampler's own."""
    temp = settings.actor.temperature
    old_logp = updates.score_rollout(
        ctx.model_config, states.policy.params, batch.tokens, batch.positions, temp
    )
    # The sampler's log-probs should equal the trainer's (PPO's ratio starts at 1).
    info = {
        "rollout/sampler_logprob_max_diff": float(
            jnp.max(jnp.abs(old_logp - batch.sampler_logprobs) * mask)
        )
    }
    ref_logp = old_logp
    if settings.actor.kl_coef > 0:
        ref_logp = updates.score_rollout(
            ctx.model_config, states.reference, batch.tokens, batch.positions, temp
        )
    return old_logp, ref_logp, info


def estimate_advantages(
    ctx: Context,
    critic_params,
    batch: rollout.Batch,
    r_np: np.ndarray,
    mask,
    settings: Settings,
    first_step: bool,
) -> Advantages:
    """Advantages of one batch: GRPO's group-normalised rewards, or decoupled GAE from the
    critic's values (lambda_actor for the actor, lambda_critic for the critic's targets), with
    the critic's and the mechanism's metrics and, on the first step, the position profile."""
    r = ctx.put(r_np)
    if settings.estimator == "grpo":
        norm = adv_lib.group_normalised_advantages(
            r_np, np.ones((len(r_np), 1), np.float32), group_size=settings.samples_per_prompt
        )
        advantages = ctx.put(norm) * mask
        out = Advantages(advantages, None, None, {})
    else:
        values = updates.critic_values(
            ctx.model_config, critic_params, batch.tokens, batch.positions
        )
        lam_actor = settings.lambda_actor
        if settings.length_adaptive_alpha is not None:
            lam_actor = adv_lib.length_adaptive_lambda(
                ctx.put(batch.lengths), settings.length_adaptive_alpha
            )
        advantages, returns = adv_lib.decoupled_gae(
            r,
            values,
            mask,
            gamma=settings.gamma,
            lambda_actor=lam_actor,
            lambda_critic=settings.lambda_critic,
        )
        adv_h, values_h = ctx.host(advantages), ctx.host(values)  # [B, T] on the host
        adv0, v0 = adv_h[:, 0], values_h[:, 0]
        metrics = {
            "gae/advantage_mean": float(adv_lib.masked_mean(advantages, mask)),
            "gae/advantage_first_token": float(adv0.mean()),
            "gae/value_first_token": float(v0.mean()),
            "gae/value_mean": float(adv_lib.masked_mean(values, mask)),
            "gae/return_mean": float(adv_lib.masked_mean(returns, mask)),
        }
        # The paper's mechanism by route: which route's first token does the critic favour?
        for route, sel in (("direct", batch.direct), ("written", ~batch.direct)):
            if sel.any():
                metrics[f"gae/advantage_first_token_{route}"] = float(adv0[sel].mean())
                metrics[f"gae/value_first_token_{route}"] = float(v0[sel].mean())
        metrics.update(
            mechanism_metrics(adv_h, values_h, r_np, ctx.host(mask), batch.lengths, batch.direct)
        )
        profile = None
        if first_step:
            _, mc = adv_lib.decoupled_gae(  # Monte Carlo returns: what values should be.
                r,
                jnp.zeros_like(values),
                mask,
                gamma=settings.gamma,
                lambda_actor=1.0,
                lambda_critic=1.0,
            )
            profile = tuple(ctx.host(x) for x in (values, advantages, mc, mask))
        out = Advantages(advantages, values, returns, metrics, profile)
    if settings.whiten_advantages:
        out.advantages = adv_lib.masked_whiten(out.advantages, mask)
    return out


def update(
    ctx: Context,
    states: ModelStates,
    batch: rollout.Batch,
    mask,
    adv: Advantages,
    old_logp,
    ref_logp,
    correct: np.ndarray,
    settings: Settings,
    rng: np.random.Generator,
) -> tuple[ModelStates, dict]:
    """``settings.epochs`` passes of minibatch updates: the critic (unless GRPO) on the
    returns, then the actor on the advantages, per minibatch. A minibatch with no real token
    (every row dropped by dynamic sampling) is skipped: its gradient is zero, but an optimiser
    step would still move the parameters (Adam's momentum). Returns the mean metrics."""
    is_positive = ctx.put(correct.astype(np.float32))
    live = ctx.host(mask).sum(1) > 0
    metrics, skipped = [], 0
    for _ in range(settings.epochs):
        for idx in ctx.minibatches(len(correct), rng):
            if not live[np.asarray(idx)].any():
                skipped += 1
                continue
            m = {}
            if adv.values is not None:
                states.critic, m = updates.critic_step(
                    ctx.model_config,
                    states.critic,
                    batch.tokens[idx],
                    batch.positions[idx],
                    mask[idx],
                    adv.returns[idx],
                    adv.values[idx],
                    value_clip=settings.value_clip,
                    agg_mode=settings.actor.agg_mode,
                )
            states.policy, am = updates.actor_step(
                ctx.model_config,
                states.policy,
                batch.tokens[idx],
                batch.positions[idx],
                mask[idx],
                old_logp[idx],
                adv.advantages[idx],
                ref_logp[idx],
                is_positive[idx],
                settings.actor,
            )
            metrics.append({**m, **am})
    return states, {
        **(mean_metrics(metrics) if metrics else {}),
        "ppo/skipped_minibatches": skipped,
    }


def step(
    ctx: Context,
    states: ModelStates,
    settings: Settings,
    key: jax.Array,
    rng: np.random.Generator,
    first_step: bool,
) -> tuple[ModelStates, dict, Advantages]:
    """One PPO step: sample from the policy, reward, score, estimate advantages, update.
    Returns the states, the step's metrics and its advantages (for the position profile)."""
    problems = ctx.train_problems(rng)
    t0 = time.time()
    batch, info, correct = ctx.sample(states.policy.params, problems, key, ctx.sampling_params)
    r_np = ctx.rewards(correct, batch)
    mask = batch.mask
    if settings.dynamic_sampling:  # Drop groups with no signal (all right / all wrong).
        n = settings.samples_per_prompt
        g = correct.reshape(-1, n)
        keep = np.repeat(~(g.all(1) | (~g).all(1)), n)
        mask = mask * ctx.put(keep.astype(np.float32)[:, None])
        info["rollout/kept_fraction"] = float(keep.mean())
    old_logp, ref_logp, score_info = score(ctx, states, batch, mask, settings)
    info.update(score_info)
    adv = estimate_advantages(ctx, states.critic.params, batch, r_np, mask, settings, first_step)
    t1 = time.time()
    values = adv.values
    states, out = update(ctx, states, batch, mask, adv, old_logp, ref_logp, correct, settings, rng)
    jax.block_until_ready(states.policy.params)
    train_s = time.time() - t1
    # How far this step's updates moved each model's outputs on the step's own batch.
    temp = settings.actor.temperature
    new_logp = updates.score_rollout(
        ctx.model_config, states.policy.params, batch.tokens, batch.positions, temp
    )
    info["mechanism/actor_speed"] = float(adv_lib.masked_mean(jnp.abs(new_logp - old_logp), mask))
    if values is not None:
        new_values = updates.critic_values(
            ctx.model_config, states.critic.params, batch.tokens, batch.positions
        )
        info["mechanism/critic_speed"] = float(
            adv_lib.masked_mean(jnp.abs(new_values - values), mask)
        )
        info["mechanism/value_first_token_after"] = float(ctx.host(new_values[:, 0]).mean())
    out.update(adv.metrics)
    out.update(rollout.rollout_metrics(batch, correct, r_np, ctx.sampling_params.max_new_tokens))
    out.update(info)
    tokens = float(jnp.sum(mask)) * settings.epochs
    out.update(
        {
            "perf/train_seconds": train_s,
            "perf/train_tokens_per_s": tokens / train_s,
            "perf/step_seconds": time.time() - t0,
        }
    )
    return states, out, adv
