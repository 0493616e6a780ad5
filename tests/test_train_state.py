"""Model-state helpers: the critic's offset, the policy's backbone, distinct copies."""

import jax
import jax.numpy as jnp
import numpy as np

from vcppo_jax import train_state


def _value_params():
    return {
        "decoder": {"w": jnp.ones((2, 2))},
        "value_head": {"kernel": jnp.ones((2, 1)), "bias": jnp.zeros((1,))},
    }


def test_critic_offset_constant_and_linear():
    p = _value_params()
    const = train_state.with_critic_offset(p, -2.0, "constant", 8)
    assert float(const["value_head"]["bias"][0]) == -2.0 and float(p["value_head"]["bias"][0]) == 0
    lin = train_state.with_critic_offset(p, -2.0, "linear", 4)
    np.testing.assert_allclose(np.asarray(lin["position_offset"]), [-2.0, -1.5, -1.0, -0.5])
    assert float(lin["value_head"]["bias"][0]) == 0.0  # The table carries the whole offset.
    again = train_state.with_critic_offset(lin, 0.0, "constant", 4)
    assert "position_offset" not in again  # An earlier table is replaced, not stacked.
    assert train_state.with_critic_offset(p, 0.0, "constant", 4) == p


def test_value_model_on_the_policy_backbone_is_a_copy():
    policy = {"decoder": {"w": jnp.full((2, 2), 3.0)}, "lm_head": jnp.ones((2, 5))}
    out = train_state.on_policy_backbone(_value_params(), policy)
    assert float(out["decoder"]["w"][0, 0]) == 3.0 and "lm_head" not in out
    assert out["decoder"]["w"] is not policy["decoder"]["w"]
    assert out["value_head"] is not None
    tree = train_state.copy_tree(policy)
    assert all(
        a is not b for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(policy), strict=True)
    )


def test_value_model_reading_its_likelihood_takes_the_policys_lm_head():
    policy = {"decoder": {"w": jnp.full((2, 2), 3.0)}, "lm_head": jnp.full((2, 5), 2.0)}
    value = dict(_value_params(), lm_head=jnp.zeros((2, 5)), likelihood_weight=jnp.zeros(()))
    out = train_state.on_policy_backbone(value, policy)
    assert float(out["lm_head"][0, 0]) == 2.0 and out["lm_head"] is not policy["lm_head"]
    assert float(out["likelihood_weight"]) == 0.0  # Its own head stays.
