"""The collapse-condition metrics of a PPO batch against a plain loop over the rows."""

import numpy as np

from vcppo_jax.stages.ppo import FIRST_TOKENS, mechanism_metrics


def test_mechanism_metrics_match_a_loop():
    rng = np.random.default_rng(0)
    b, t = 12, 20
    lengths = rng.integers(1, t + 1, size=b)
    lengths[:3] = [3, 5, 6]
    direct = np.zeros(b, bool)
    direct[:3] = True
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    adv = rng.normal(size=(b, t)) * mask
    values = rng.normal(size=(b, t)) * mask
    r = np.zeros((b, t))
    seq_r = rng.choice([-1.0, 1.0], size=b)
    r[np.arange(b), lengths - 1] = seq_r
    m = mechanism_metrics(adv, values, r, mask, lengths, direct)

    first = lambda x, i: x[i, : min(FIRST_TOKENS, lengths[i])].mean()
    prefix = lambda i: values[i, : lengths[i]].mean()
    short, long_ = np.flatnonzero(direct), np.flatnonzero(~direct)
    np.testing.assert_allclose(m["mechanism/reward_short"], seq_r[short].mean())
    np.testing.assert_allclose(m["mechanism/reward_long"], seq_r[long_].mean())
    np.testing.assert_allclose(
        m["mechanism/value_prefix_short"], np.mean([prefix(i) for i in short])
    )
    np.testing.assert_allclose(
        m["mechanism/collapse_margin"],
        seq_r[short].mean() - np.mean([prefix(i) for i in short]),
    )
    np.testing.assert_allclose(
        m["mechanism/advantage_first_tokens_long"], np.mean([first(adv, i) for i in long_])
    )
    np.testing.assert_allclose(
        m["mechanism/value_first_tokens"], np.mean([first(values, i) for i in range(b)])
    )
    order = np.argsort(lengths, kind="stable")
    q1 = order[:3]
    np.testing.assert_allclose(
        m["mechanism/advantage_first_tokens_q1"], np.mean([first(adv, i) for i in q1])
    )
    assert m["mechanism/length_q1"] <= m["mechanism/length_q4"]


def test_no_short_answers_leaves_their_metrics_out():
    mask = np.ones((4, 6), np.float32)
    m = mechanism_metrics(
        np.zeros((4, 6)), np.zeros((4, 6)), np.zeros((4, 6)), mask, np.full(4, 6), np.zeros(4, bool)
    )
    assert "mechanism/reward_short" not in m and "mechanism/collapse_margin" not in m
    assert "mechanism/reward_long" in m
