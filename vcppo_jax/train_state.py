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
import numpy as np
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


def copy_tree(tree):
    """A distinct copy: update steps donate their state, so no two states may share buffers."""
    return jax.tree.map(jnp.copy, tree)


def on_policy_backbone(value_params: dict, policy_params: dict) -> dict:
    """A value model's parameters on (a copy of) the policy's backbone, keeping its own value
    head: how the reward model, and a critic started from the policy, are initialised. A value
    model that reads its own likelihood (``value_inputs="hidden+likelihood"``) also takes the
    policy's LM head (untied embeddings; tied ones come with the decoder)."""
    params = dict(value_params)
    params["decoder"] = copy_tree(policy_params["decoder"])
    if "lm_head" in value_params:
        params["lm_head"] = copy_tree(policy_params["lm_head"])
    return params


def with_critic_offset(
    params: dict, offset: float, profile: str, max_new_tokens: int, to_mesh=jnp.asarray
) -> dict:
    """A value model's parameters as the critic holds them, with ``offset`` added to its
    output: on every state (``profile="constant"``: the value head's bias) or as a trainable
    per-response-token table (``"linear"``: ``offset * (1 - t / max_new_tokens)`` on token t).
    Any earlier table is replaced; ``to_mesh`` places the table (replicated)."""
    params = {k: v for k, v in params.items() if k != "position_offset"}  # Set afresh.
    if profile == "linear":
        n = max_new_tokens
        table = offset * (1.0 - np.arange(n, dtype=np.float32) / n)
        params["position_offset"] = to_mesh(table)
    elif offset:
        head = dict(params["value_head"])
        head["bias"] = head["bias"] + jnp.asarray(offset, head["bias"].dtype)
        params["value_head"] = head
    return params
