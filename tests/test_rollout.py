"""Rollout helpers: pair encoding in sampler layout, routes, and the rollout metrics."""

import numpy as np

from vcppo_jax import rollout


class CharTokenizer:
    """One token per character (ids from 4), bos 1, eos 2, pad 0."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def format_prompt(self, p):
        return p

    def encode(self, text, add_bos=False, add_eos=False):
        return [1] * add_bos + [4 + ord(ch) % 90 for ch in text] + [2] * add_eos


def test_encode_pairs_against_hand_layout():
    tok = CharTokenizer()
    tokens, positions, mask, rlen = rollout.encode_pairs(
        tok, ["ab", "abcd"], ["xyz", "x"], pad_multiple=4
    )
    # Prompt (bos + chars) then response (chars + eos) from slot 0; widths rounded up to 4.
    assert rlen.tolist() == [4, 2] and positions.shape == (2, 4) and tokens.shape == (2, 12)
    for i, (p, r) in enumerate((("ab", "xyz"), ("abcd", "x"))):
        row = tok.encode(p, add_bos=True) + tok.encode(r, add_eos=True)
        assert tokens[i, : len(row)].tolist() == row and (tokens[i, len(row) :] == 0).all()
        n = len(r) + 1
        assert positions[i, :n].tolist() == list(range(len(p) + 1, len(p) + 1 + n))
        assert mask[i].tolist() == [1.0] * n + [0.0] * (4 - n)


def test_routes_and_rollout_metrics():
    assert rollout.is_direct(" Answer: 12") and not rollout.is_direct(" b5:3+5=8 . Answer: 8")
    direct = np.array([True, False, False, False])
    correct = np.array([False, True, True, False])
    m = rollout.route_metrics("x", direct, correct)
    assert m == {
        "x/direct_fraction": 0.25,
        "x/accuracy_direct_route": 0.0,
        "x/accuracy_written_route": 2 / 3,
    }
    assert rollout.route_metrics("x", ~direct | True, correct)["x/accuracy_written_route"] == -1
    answered = np.array([True, True, True, False])
    batch = rollout.Batch(None, None, None, np.array([3, 10, 7, 10]), None, answered, direct)
    r = np.zeros((4, 10))
    r[np.arange(4), [2, 9, 6, 9]] = [-1, 1, 1, -1]
    out = rollout.rollout_metrics(batch, correct, r, max_new_tokens=10)
    assert out["rollout/accuracy"] == 0.5 and out["rollout/response_length_mean"] == 7.5
    assert out["rollout/truncated_fraction"] == 0.5 and out["rollout/no_answer_fraction"] == 0.25
    assert out["rollout/reward_mean"] == 0.0 and out["rollout/response_length_max"] == 10
    # Of the two responses at the limit, one wrote its EOS as the last allowed token: ended.
    batch.ended = np.array([True, True, True, False])
    out = rollout.rollout_metrics(batch, correct, r, max_new_tokens=10)
    assert out["rollout/truncated_fraction"] == 0.25
