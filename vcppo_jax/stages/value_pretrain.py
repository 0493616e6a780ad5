"""Value pretraining (VC-PPO section 4.1): responses from the fixed SFT policy, the critic
regressed on their Monte Carlo returns (GAE with lambda = ``Settings.lambda_``, 1 in the paper).

The paper pretrains "until value loss and explained variance converge". With
``value_pretrain.until = "plateau"`` the stage stops at the first step where, over the last
``window`` steps against the ``window`` before them, the mean value loss fell by less than
``tol`` (relative) and the mean explained variance rose by less than ``tol`` (absolute);
``value_pretrain.steps`` caps it. Both gains are logged every step once defined
(``critic/plateau_loss_gain``, ``critic/plateau_ev_gain``).
"""

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


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When value pretraining ends (``value_pretrain.until``, ``plateau_window``, ``_tol``)."""

    until: str  # "steps": run value_pretrain.steps; "plateau": stop earlier once converged.
    window: int
    tol: float


def plateau_gains(history: list[list[float]], window: int) -> tuple[float, float] | None:
    """(relative value-loss fall, explained-variance rise) of the mean over the last ``window``
    steps against the ``window`` before; None until there are ``2 * window`` steps.
    ``history`` holds one ``[value_loss, explained_variance]`` per step."""
    if len(history) < 2 * window:
        return None
    h = np.asarray(history[-2 * window :], np.float64)
    before, last = h[:window].mean(axis=0), h[window:].mean(axis=0)
    loss_gain = (before[0] - last[0]) / max(abs(before[0]), 1e-12)
    return float(loss_gain), float(last[1] - before[1])


def plateaued(history: list[list[float]], rule: StopRule) -> bool:
    """Whether ``rule`` ends value pretraining after the steps in ``history``."""
    gains = plateau_gains(history, rule.window)
    return rule.until == "plateau" and gains is not None and max(gains) < rule.tol


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
