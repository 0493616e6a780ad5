"""Value pretraining (VC-PPO section 4.1): responses from the fixed SFT policy, the critic
regressed on their Monte Carlo returns (GAE with lambda = ``Settings.lambda_``, 1 in the paper)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from vcppo_jax import advantages as adv_lib
from vcppo_jax import rollout, updates
from vcppo_jax.stages import Context, mean_metrics
from vcppo_jax.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class Settings:
    """Value pretraining's config fields (``value_pretrain.*``, ``gae.gamma``, ``ppo.*``)."""

    lambda_: float
    gamma: float
    epochs: int  # Passes over each batch (ppo.epochs), in ppo.minibatches minibatches.
    agg_mode: str


def step(
    ctx: Context,
    critic: TrainState,
    policy_params,
    settings: Settings,
    key: jax.Array,
    rng: np.random.Generator,
) -> tuple[TrainState, dict]:
    """Samples a batch from the (fixed) policy and fits the critic to its returns."""
    problems = ctx.train_problems(rng)
    batch, info, correct = ctx.sample(policy_params, problems, key, ctx.sampling_params)
    r = ctx.put(ctx.rewards(correct, batch))
    values = updates.critic_values(ctx.model_config, critic.params, batch.tokens, batch.positions)
    lam = settings.lambda_
    _, returns = adv_lib.decoupled_gae(
        r, values, batch.mask, gamma=settings.gamma, lambda_actor=lam, lambda_critic=lam
    )
    metrics = []
    for _ in range(settings.epochs):
        for idx in ctx.minibatches(len(problems), rng):
            critic, m = updates.critic_step(
                ctx.model_config,
                critic,
                batch.tokens[idx],
                batch.positions[idx],
                batch.mask[idx],
                returns[idx],
                values[idx],
                value_clip=None,
                agg_mode=settings.agg_mode,
            )
            metrics.append(m)
    out = mean_metrics(metrics)
    out.update(
        rollout.rollout_metrics(batch, correct, ctx.host(r), ctx.sampling_params.max_new_tokens)
    )
    out.update(info)
    return critic, out
