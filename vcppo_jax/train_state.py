"""Model states: ``TrainState`` (parameters + optimiser), the optimiser factory, and
``ModelStates``, every model an experiment holds in one pytree, which is also what a checkpoint
saves and restores (no conversion on either side).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Parameters, optimiser state and step count; the optimiser itself is static metadata."""

    params: Any
    opt_state: Any
    step: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> TrainState:
        """A state at step 0 with the optimiser state initialised for ``params``."""
        return cls(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), tx=tx)

    def apply_gradients(self, grads) -> tuple[TrainState, jax.Array]:
        """One optimiser step -> (state at step + 1, global norm of ``grads`` before clipping)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(params=params, opt_state=opt_state, step=self.step + 1), (
            optax.global_norm(grads)
        )


def make_optimizer(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    grad_clip: float = 1.0,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW (b1 0.9, b2 0.95) after clipping by global norm at ``grad_clip``, with a linear
    warm-up from 0 over ``warmup_steps`` when that is > 0."""
    schedule = (
        optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else learning_rate
    )
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay),
    )


@dataclasses.dataclass
class ModelStates:
    """The experiment's models: the PPO policy, the SFT policy (its own optimiser), the critic,
    the reward model and the frozen reference policy (parameters only). A pytree whose leaves
    are the arrays a checkpoint holds: ``checkpointer.save(step, states, ...)``."""

    policy: TrainState
    sft: TrainState
    critic: TrainState
    reward_model: TrainState
    reference: Any


jax.tree_util.register_dataclass(
    ModelStates,
    data_fields=[f.name for f in dataclasses.fields(ModelStates)],
    meta_fields=[],
)
