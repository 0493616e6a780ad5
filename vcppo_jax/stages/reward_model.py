"""The reward model (the critic's start in the paper's PPO baseline): a value-head model
trained on balanced right / wrong responses of both routes, scored at the last token."""

from __future__ import annotations

import dataclasses

import numpy as np

from vcppo_jax import updates
from vcppo_jax.data.synthetic import AdditionTask
from vcppo_jax.stages import Context
from vcppo_jax.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class Settings:
    """The reward model's config fields (``reward_model.*``, ``reward.*``)."""

    batch_size: int
    direct_fraction: float  # Share of pairs whose response takes the short route.
    correct: float  # Target for a right response (reward.correct).
    incorrect: float  # Target for a wrong one (reward.incorrect).


def balanced_pairs(
    task: AdditionTask, settings: Settings, rng: np.random.Generator
) -> tuple[list, list[str], list[float]]:
    """(problems, responses, targets): every other response right, the rest wrong answers of
    the same shape (``task.wrong_solution``); routes drawn with ``direct_fraction``."""
    problems = task.problems(settings.batch_size, int(rng.integers(2**31)))
    responses, targets = [], []
    for i, p in enumerate(problems):
        full = rng.random() >= settings.direct_fraction
        right = i % 2 == 0
        responses.append(
            (p.full_solution if full else p.direct_solution)
            if right
            else task.wrong_solution(p, rng, full)
        )
        targets.append(settings.correct if right else settings.incorrect)
    return problems, responses, targets


def step(
    ctx: Context, state: TrainState, settings: Settings, rng: np.random.Generator
) -> tuple[TrainState, dict]:
    """One reward-model update on a fresh balanced batch drawn with ``rng``."""
    problems, responses, targets = balanced_pairs(ctx.task, settings, rng)
    b = ctx.encode_pairs([p.prompt for p in problems], responses)
    last = ctx.host(b.positions)[np.arange(len(problems)), b.lengths - 1]
    return updates.reward_model_step(
        ctx.model_config,
        state,
        b.tokens,
        ctx.put(last),
        ctx.put(np.asarray(targets, np.float32)),
    )
