"""Supervised fine-tuning of the policy on the synthetic task's demonstrations."""

from __future__ import annotations

import dataclasses

import numpy as np

from vcppo_jax import updates
from vcppo_jax.data.synthetic import sft_examples
from vcppo_jax.stages import Context
from vcppo_jax.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class Settings:
    """SFT's config fields (``sft.*``, ``data.direct_fraction``)."""

    batch_size: int
    direct_fraction: float  # Share of demonstrations that take the short route.
    min_terms: int = 0  # > 0: chain lengths drawn from [min_terms, task.num_terms].


def step(
    ctx: Context, state: TrainState, settings: Settings, rng: np.random.Generator
) -> tuple[TrainState, dict]:
    """One SFT update on a fresh batch of demonstrations drawn with ``rng``."""
    seed = int(rng.integers(2**31))
    pairs = sft_examples(
        ctx.task, settings.batch_size, seed, settings.direct_fraction, settings.min_terms
    )
    b = ctx.encode_pairs([p for p, _ in pairs], [r for _, r in pairs])
    return updates.sft_step(ctx.model_config, state, b.tokens, b.positions, b.mask)
