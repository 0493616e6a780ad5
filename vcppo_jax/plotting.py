"""The paper's figures from ``metrics.jsonl`` files (matplotlib only; no JAX).

    python -m vcppo_jax.plotting --runs vcppo=/tmp/a ppo=/tmp/b --out /tmp/figs

draws, for one or several runs overlaid: response length, accuracy (training rollouts and
held-out evaluation), reward, critic value loss and explained variance against PPO step, the
value-pretraining curves, and value / advantage by token position at the start of PPO.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vcppo_jax.metrics import read_metrics  # noqa: E402

PPO_PANELS = (
    ("rollout/response_length_mean", "ppo", "response length (tokens)"),
    ("rollout/accuracy", "ppo", "training accuracy"),
    ("eval/accuracy", "eval", "held-out accuracy (greedy)"),
    ("rollout/reward_mean", "ppo", "mean reward"),
    ("critic/value_loss", "ppo", "critic value loss"),
    ("critic/explained_variance", "ppo", "critic explained variance"),
)


def _series(rows, stage: str, key: str):
    pts = [
        (r["step"], r[key])
        for r in rows
        if r["stage"] == stage and isinstance(r.get(key), (int, float))
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: dict[str, str], out_dir: str) -> list[str]:
    """runs: label -> workdir (or metrics.jsonl). Returns the PNG paths written."""
    os.makedirs(out_dir, exist_ok=True)
    data = {label: read_metrics(path) for label, path in runs.items()}
    written = []

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, stage, title) in zip(axes.flat, PPO_PANELS, strict=True):
        for label, rows in data.items():
            x, y = _series(rows, stage, key)
            if x:
                ax.plot(x, y, label=label, marker="." if len(x) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "ppo_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    vp = {
        label: rows
        for label, rows in data.items()
        if any(r["stage"] == "value_pretrain" for r in rows)
    }
    if vp:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for label, rows in vp.items():
            for ax, key in zip(
                axes, ("critic/value_loss", "critic/explained_variance"), strict=True
            ):
                x, y = _series(rows, "value_pretrain", key)
                ax.plot(x, y, label=label)
                ax.set_title(f"value pretraining: {key.split('/')[1].replace('_', ' ')}")
                ax.set_xlabel("value-pretraining step")
                ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "value_pretraining.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    profiles = {}
    for label, path in runs.items():
        wd = path if os.path.isdir(path) else os.path.dirname(path)
        prof = os.path.join(wd, "position_profile.json")
        if os.path.exists(prof):
            with open(prof) as f:
                profiles[label] = json.load(f)
    if profiles:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for label, prof in profiles.items():
            for ax, key in zip(axes, ("value", "advantage"), strict=True):
                pts = [(i, v) for i, v in enumerate(prof[key]) if v is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
                ax.set_title(f"{key} by token position at the start of PPO")
                ax.set_xlabel("response token position")
                ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "value_advantage_by_position.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="label=workdir ...")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = os.path.basename(os.path.normpath(spec)), spec
        if not os.path.exists(path):
            parser.error(f"{path}: no such workdir or metrics file")
        runs[label] = path
    for p in plot_runs(runs, args.out):
        print(p)


if __name__ == "__main__":
    main()
