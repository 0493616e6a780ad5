"""Figures from metrics files."""

import json
import os

from vcppo_jax import plotting


def write_run(path, scale):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for s in range(5):
            f.write(
                json.dumps(
                    {
                        "step": s,
                        "stage": "value_pretrain",
                        "critic/value_loss": 1 / (s + 1),
                        "critic/explained_variance": s / 5,
                    }
                )
                + "\n"
            )
        for s in range(10):
            f.write(
                json.dumps(
                    {
                        "step": s,
                        "stage": "ppo",
                        "rollout/response_length_mean": scale * (40 - s),
                        "rollout/accuracy": 0.4,
                        "rollout/reward_mean": -0.2,
                        "critic/value_loss": 0.1,
                        "critic/explained_variance": 0.5,
                    }
                )
                + "\n"
            )
        f.write(json.dumps({"step": 0, "stage": "eval", "eval/accuracy": 0.4}) + "\n")
    with open(os.path.join(path, "position_profile.json"), "w") as f:
        json.dump(
            {"value": [0.1, 0.2, None], "advantage": [0.3, None, None], "count": [3, 2, 0]}, f
        )


def test_plot_runs_writes_every_figure(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_run(a, 1.0)
    write_run(b, 0.5)
    out = plotting.plot_runs({"vcppo": a, "ppo": b}, str(tmp_path / "figs"))
    names = sorted(os.path.basename(p) for p in out)
    assert names == ["ppo_curves.png", "value_advantage_by_position.png", "value_pretraining.png"]
    for p in out:
        assert os.path.getsize(p) > 10_000  # A real image, not an empty canvas.


def test_profile_bias_is_value_minus_return(tmp_path):
    with open(tmp_path / "position_profile.json", "w") as f:
        json.dump(
            {
                "value": [0.5, -0.25, None],
                "return": [1.0, -1.0, None],
                "advantage": [0.0, 0.0, None],
                "count": [2, 1, 0],
            },
            f,
        )
    prof = plotting.load_profile(str(tmp_path))
    assert prof["value_minus_return"] == [-0.5, 0.75, None]
    old = {"value": [0.1], "advantage": [0.0], "count": [1]}  # Written before returns were.
    assert plotting.profile_keys([prof]) == ["value", "value_minus_return", "advantage"]
    assert plotting.profile_keys([prof, old]) == ["value", "advantage"]
