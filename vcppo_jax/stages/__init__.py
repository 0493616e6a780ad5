"""The experiment's stages, one module each: ``sft``, ``reward_model``, ``value_pretrain``,
``ppo`` (and ``evaluation`` beside it). Each exposes a settings dataclass (the stage's config
fields, built by the runner) and a ``step`` function: one update of the stage's model(s) from a
batch it draws with the step's RNG, returning the new state(s) and the step's metrics. What the
stages share (the model config, the task and prompt source, device placement, sampling,
rewards) arrives as one ``Context``. Nothing here reads the experiment config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from vcppo_jax.data.synthetic import AdditionTask
from vcppo_jax.models import ModelConfig
from vcppo_jax.rollout import Batch
from vcppo_jax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Context:
    """The machinery every stage step uses besides the model states (built once per run)."""

    model_config: ModelConfig
    task: AdditionTask  # The synthetic task (demonstrations, reward-model pairs).
    source: Any  # Prompts and answer checking: data.sources.SyntheticSource or MathSource.
    tokenizer: Any
    sampling_params: SamplingParams
    greedy_params: SamplingParams
    # A host array -> a global array on the mesh (batch-split when it divides), and back.
    put: Callable[[np.ndarray], jax.Array]
    host: Callable[[jax.Array], np.ndarray]
    # (prompts, responses) -> a Batch on the mesh.
    encode_pairs: Callable[[list[str], list[str]], Batch]
    # (params, problems, key, sampling params[, forced]) -> (Batch, metrics, correct [B]).
    sample: Callable[..., tuple[Batch, dict, np.ndarray]]
    # (correct [B], batch) -> terminal token rewards [B, N] on the host.
    rewards: Callable[[np.ndarray, Batch], np.ndarray]
    # The rollout problems of one step (each repeated samples_per_prompt times), from its RNG.
    train_problems: Callable[[np.random.Generator], list]
    # (batch size, rng) -> index arrays of the minibatches of one epoch.
    minibatches: Callable[[int, np.random.Generator], Iterator[jax.Array]]


def mean_metrics(metrics: list[dict]) -> dict[str, float]:
    """Mean of each metric over the minibatch updates of one step."""
    return {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}
