"""Update steps: the response-aligned gathers against hand indexing, and steps that learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcppo_jax import models, train_state, updates
from vcppo_jax.models import ModelConfig

CFG = ModelConfig(
    vocab_size=24, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 24, size=(3, 12)))
    plen = np.array([3, 5, 2])
    n = 6
    positions = jnp.asarray(plen[:, None] + np.arange(n)[None])
    mask = jnp.asarray((np.arange(n)[None] < np.array([[6], [4], [1]])).astype(np.float32))
    return tokens, positions, mask


def test_response_gathers_match_hand_indexing():
    tokens, positions, _ = batch()
    params = models.init_params(CFG, jax.random.key(0))
    critic = models.init_params(CFG, jax.random.key(1), "value")
    critic["value_head"]["kernel"] = jnp.ones_like(critic["value_head"]["kernel"])
    logp = updates.response_logprobs(CFG, params, tokens, positions)
    values = updates.response_values(CFG, critic, tokens, positions)
    full = jax.nn.log_softmax(models.forward(CFG, params, tokens), axis=-1)
    v_full = models.values(CFG, critic, tokens)
    for b in range(3):
        for t in range(6):
            p = int(positions[b, t])
            # The token at slot p is predicted by the logits at p - 1; V(s_t) scores the prefix
            # that ends at slot p - 1.
            np.testing.assert_allclose(
                float(logp[b, t]), float(full[b, p - 1, tokens[b, p]]), atol=1e-5
            )
            np.testing.assert_allclose(float(values[b, t]), float(v_full[b, p - 1]), atol=1e-6)


def test_sft_step_learns_a_fixed_batch():
    tokens, positions, mask = batch(1)
    state = train_state.TrainState.create(
        models.init_params(CFG, jax.random.key(0)), train_state.make_optimizer(1e-2)
    )
    losses = []
    for _ in range(30):
        state, m = updates.sft_step(CFG, state, tokens, positions, mask)
        losses.append(float(m["sft/loss"]))
    assert losses[-1] < 0.3 * losses[0]
    assert int(state.step) == 30


def test_critic_step_fits_returns_and_actor_step_follows_advantages():
    tokens, positions, mask = batch(2)
    critic = train_state.TrainState.create(
        models.init_params(CFG, jax.random.key(1), "value"), train_state.make_optimizer(1e-2)
    )
    returns = jnp.where(mask > 0, 0.7, 0.0)
    old_v = jnp.zeros_like(returns)
    first = None
    for _ in range(40):
        critic, m = updates.critic_step(CFG, critic, tokens, positions, mask, returns, old_v)
        first = first if first is not None else float(m["critic/value_loss"])
    assert float(m["critic/value_loss"]) < 0.05 * first

    params = models.init_params(CFG, jax.random.key(3))
    actor = train_state.TrainState.create(params, train_state.make_optimizer(3e-3))
    old_logp = updates.score_rollout(CFG, params, tokens, positions)
    adv = jnp.where(mask > 0, 1.0, 0.0)  # Every sampled token was good: make it likelier.
    settings = updates.ActorSettings()
    actor, m = updates.actor_step(
        CFG, actor, tokens, positions, mask, old_logp, adv, old_logp, jnp.ones(3), settings
    )
    # One program scores, another updates: equal on a CPU, within ulps where reductions differ.
    assert float(m["actor/ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(m["actor/clip_fraction"]) == 0.0
    new_logp = updates.score_rollout(CFG, actor.params, tokens, positions)
    gain = (new_logp - old_logp) * mask
    assert float(gain.sum()) > 0


def test_position_offset_table_adds_per_response_token():
    """critic.init_offset_profile='linear' stores a per-response-token table beside the model;
    the critic's values are the model's plus the table at each response index."""
    tokens, positions, _ = batch()
    critic = models.init_params(CFG, jax.random.key(1), "value")
    critic["value_head"]["kernel"] = jnp.ones_like(critic["value_head"]["kernel"])
    plain = updates.response_values(CFG, critic, tokens, positions)
    table = jnp.linspace(-2.0, 0.0, 8)
    shifted = updates.response_values(CFG, {**critic, "position_offset": table}, tokens, positions)
    np.testing.assert_allclose(np.asarray(shifted - plain), np.tile(table[:6], (3, 1)), atol=1e-6)
    # The table is trainable like any other critic parameter.
    state = train_state.TrainState.create(
        {**critic, "position_offset": table}, train_state.make_optimizer(1e-2, grad_clip=1.0)
    )
    before = np.asarray(table)
    mask = jnp.ones((3, 6))
    new, _ = updates.critic_step(CFG, state, tokens, positions, mask, jnp.zeros((3, 6)), shifted)
    after = np.asarray(new.params["position_offset"])
    assert not np.allclose(after[:6], before[:6])
    np.testing.assert_array_equal(after[6:], before[6:])  # Indices past the batch: no gradient.


def test_actor_settings_are_checked_when_made():
    assert updates.ActorSettings(eps_high=0.28, dual_clip=3.0).eps_high == 0.28
    with pytest.raises(ValueError, match=r"eps_high=0.1: must be >= eps_low=0.2"):
        updates.ActorSettings(eps_high=0.1)
    with pytest.raises(ValueError, match=r"agg_mode='sum'.*kl_coef=-1"):
        updates.ActorSettings(agg_mode="sum", kl_coef=-1.0)


@pytest.mark.parametrize("loss_on", ["last_token", "every_token", "process", "min"])
def test_reward_model_loss_against_hand_computation(loss_on):
    """The reward-model loss at EOS, or over every response token's slot (masked mean), each
    against the outcome; accuracy at EOS either way."""
    tokens, positions, mask = batch(3)
    params = models.init_params(CFG, jax.random.key(4), "value")
    params["value_head"]["kernel"] = 0.3 * jnp.ones_like(params["value_head"]["kernel"])
    lengths = np.asarray(mask.sum(1)).astype(int)
    last = jnp.asarray(np.asarray(positions)[np.arange(3), lengths - 1])
    targets = jnp.asarray([1.0, -1.0, 1.0])
    v = np.asarray(models.values(CFG, params, tokens), np.float64)
    t = np.asarray(targets)
    # Per-token targets (process): row 1 is wrong from its second response token on.
    per_token = np.tile(t[:, None], (1, positions.shape[1])).astype(np.float32)
    per_token[1, :1] = 1.0
    kw = {}
    acc = np.mean([np.sign(v[b, int(last[b])]) == np.sign(t[b]) for b in range(3)])
    if loss_on == "last_token":
        want = 0.5 * np.mean([(v[b, int(last[b])] - t[b]) ** 2 for b in range(3)])
        extra = ()
    elif loss_on == "min":  # The lowest score over each response's own slots.
        lows = [min(v[b, int(positions[b, j])] for j in range(lengths[b])) for b in range(3)]
        want = 0.5 * np.mean([(lows[b] - t[b]) ** 2 for b in range(3)])
        acc = np.mean([np.sign(lows[b]) == np.sign(t[b]) for b in range(3)])
        extra = (positions, mask)
        kw = {"on_min": True}
    else:
        tt = per_token if loss_on == "process" else np.tile(t[:, None], (1, positions.shape[1]))
        errs = [
            (v[b, int(positions[b, j])] - tt[b, j]) ** 2
            for b in range(3)
            for j in range(lengths[b])
        ]
        want = 0.5 * np.mean(errs)
        extra = (positions, mask)
        if loss_on == "process":
            kw = {"token_targets": jnp.asarray(per_token)}
    state = train_state.TrainState.create(params, train_state.make_optimizer(1e-2))
    state, m = updates.reward_model_step(CFG, state, tokens, last, targets, *extra, **kw)
    np.testing.assert_allclose(float(m["rm/loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["rm/accuracy"]), acc)
    assert int(state.step) == 1


def test_a_minibatch_with_no_real_token_takes_no_optimiser_step():
    """Dynamic sampling masks the groups it drops; a minibatch of dropped rows only has zero
    gradients, but an Adam step would still move the parameters (its momentum)."""
    import types

    from vcppo_jax.stages import ppo

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 24, size=(4, 12)))
    positions = jnp.asarray(3 + np.arange(6)[None].repeat(4, 0))
    mask = jnp.asarray(np.array([[1.0] * 6, [1.0] * 3 + [0.0] * 3, [0.0] * 6, [0.0] * 6]))
    tx = train_state.make_optimizer(1e-2)
    policy = models.init_params(CFG, jax.random.key(0))
    critic = models.init_params(CFG, jax.random.key(1), "value")
    adv = ppo.Advantages(jnp.asarray(rng.normal(size=(4, 6))) * mask, jnp.zeros((4, 6)),
                         jnp.ones((4, 6)) * mask, {})  # fmt: skip
    logp = updates.response_logprobs(CFG, policy, tokens, positions)
    batch_ = types.SimpleNamespace(tokens=tokens, positions=positions)
    settings = ppo.Settings(actor=updates.ActorSettings())

    def run(minibatches, m):
        ctx = types.SimpleNamespace(
            model_config=CFG, put=jnp.asarray, host=np.asarray,
            minibatches=lambda n, rng: iter(jnp.asarray(i) for i in minibatches),
        )  # fmt: skip
        states = types.SimpleNamespace(
            policy=train_state.TrainState.create(train_state.copy_tree(policy), tx),
            critic=train_state.TrainState.create(train_state.copy_tree(critic), tx),
        )
        correct = np.array([True, False, True, False])
        states, out = ppo.update(ctx, states, batch_, m, adv, logp, logp, correct, settings, rng)
        return states, out

    live_only, out = run([[0, 1]], mask)
    assert out["ppo/skipped_minibatches"] == 0
    both, out = run([[0, 1], [2, 3]], mask)  # The second minibatch is dropped rows only.
    assert out["ppo/skipped_minibatches"] == 1
    for name in ("policy", "critic"):
        a, b = getattr(live_only, name).params, getattr(both, name).params
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    none, out = run([[0, 1], [2, 3]], jnp.zeros_like(mask))  # Every row dropped.
    assert out == {"ppo/skipped_minibatches": 2}
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
        none.policy.params,
        policy,
    )
