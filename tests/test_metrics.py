"""metrics.jsonl rows trimmed to a resume point; position profiles against a loop."""

import json

import numpy as np
import pytest

from vcppo_jax import metrics


def test_trim_to_keeps_what_a_resumed_run_will_not_write_again(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    stages = ["sft", "value_pretrain", "ppo"]
    for s in range(3):
        w.write(s, "sft", {"loss": 1.0})
    for s in range(2):
        w.write(s, "value_pretrain", {"loss": 1.0})
    w.write(0, "eval", {"acc": 0.1})
    w.write(0, "ppo", {"acc": 0.2})
    w.write(1, "ppo", {"acc": 0.3})
    w.write(2, "eval", {"acc": 0.4})
    w.write(0, "reward_model", {"loss": 1.0})  # A stage this run does not have.
    w.trim_to(stages, 2, 1)  # Resume before PPO step 1: its row and later ones go.
    w.write(1, "ppo", {"acc": 0.5})
    w.close()
    rows = metrics.read_metrics(str(tmp_path))
    assert [(r["stage"], r["step"]) for r in rows] == [
        ("sft", 0), ("sft", 1), ("sft", 2), ("value_pretrain", 0), ("value_pretrain", 1),
        ("eval", 0), ("ppo", 0), ("ppo", 1),
    ]  # fmt: skip
    assert rows[-1]["acc"] == 0.5


def test_position_profile_against_a_loop(tmp_path):
    rng = np.random.default_rng(0)
    v, a, r = (rng.normal(size=(4, 6)) for _ in range(3))
    mask = np.array([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5], np.float32)
    mask[:, 5] = 0  # No response reaches the last position.
    prof = metrics.position_profile(v, a, r, mask)
    for t in range(6):
        rows = [b for b in range(4) if mask[b, t]]
        assert prof["count"][t] == len(rows)
        for name, x in (("value", v), ("advantage", a), ("return", r)):
            want = np.mean([x[b, t] for b in rows]) if rows else None
            assert (prof[name][t] is None) if want is None else np.isclose(prof[name][t], want)
    metrics.write_profile(str(tmp_path), prof)
    loaded = metrics.load_profile(str(tmp_path))
    assert loaded["value"] == json.loads(json.dumps(prof["value"]))
    assert loaded["value_minus_return"][0] == prof["value"][0] - prof["return"][0]


def test_a_torn_last_line_is_dropped_and_a_bad_middle_line_named(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "stage": "sft"}\n{"step": 1, "stage": "sft"}\n{"step": 2, "st')
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [0, 1]
    assert "dropping a torn last line" in capsys.readouterr().err
    w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    w.trim_to(["sft"], 0, 1)  # Resume after SFT step 0: keeps row 0 only, the torn one gone.
    w.write(1, "sft", {})
    w.close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [0, 1]
    path.write_text('{"step": 0, "stage": "sft"}\nnot json\n{"step": 2, "stage": "sft"}\n')
    with pytest.raises(ValueError, match="line 2: not a JSON row"):
        metrics.read_metrics(str(path))
