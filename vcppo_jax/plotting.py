"""The paper's figures from ``metrics.jsonl`` files (matplotlib only; no JAX).

    python -m vcppo_jax.plotting --runs vcppo=/tmp/a ppo=/tmp/b --out /tmp/figs

draws, for one or several runs overlaid: response length, accuracy (training rollouts and
held-out evaluation), reward, critic value loss and explained variance against PPO step, the
value-pretraining curves, and value / advantage by token position at the start of PPO.
"""

from __future__ import annotations

import argparse
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vcppo_jax.metrics import load_profile, read_metrics  # noqa: E402

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


Series = dict[str, tuple[list, list]]  # label -> (x, y)


def save_panels(path: str, panels: list[tuple[str, str, Series]], ncols: int) -> str:
    """One figure of line panels ``(title, xlabel, {label: (x, y)})``, legend on the first
    (and on any panel whose lines differ from the first's)."""
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    for ax, (title, xlabel, series) in zip(axes.flat, panels, strict=False):
        for i, (label, (x, y)) in enumerate(series.items()):
            if len(x):  # Colour and line style together: every series stays distinct.
                ax.plot(
                    x,
                    y,
                    label=label,
                    color=colors[i % len(colors)],
                    linestyle=styles[(i // len(colors)) % len(styles)],
                    marker="." if len(x) < 30 else None,
                )
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax, (_, _, series) in list(zip(axes.flat, panels, strict=False))[1:]:
        if set(series) != set(panels[0][2]):  # Other lines than the first panel's: own legend.
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PROFILE_TITLES = {
    "value": "value",
    "value_minus_return": "value minus Monte Carlo return (critic bias)",
    "advantage": "advantage",
}


def profile_keys(profiles) -> list[str]:
    """The profile panels every given profile can draw."""
    return [k for k in PROFILE_TITLES if all(k in p for p in profiles)]


def profile_series(prof: dict, key: str) -> tuple[list, list]:
    """(positions, values) of one position-profile key, skipping positions with no value."""
    pts = [(i, v) for i, v in enumerate(prof[key]) if v is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


VP_KEYS = ("critic/value_loss", "critic/explained_variance")


def vp_title(key: str) -> str:
    """Panel title of a value-pretraining metric: ``critic/value_loss`` gives
    ``value pretraining: value loss``."""
    return f"value pretraining: {key.split('/')[1].replace('_', ' ')}"


# The collapse condition by PPO step (vcppo_jax.stages.ppo.mechanism_metrics): title -> keys.
MECHANISM_PANELS = (
    (
        "critic value on prefixes vs reward (short / long answers)",
        ("mechanism/value_prefix_short", "mechanism/reward_short", "mechanism/reward_long"),
    ),
    ("collapse margin: reward_short - value_prefix_short", ("mechanism/collapse_margin",)),
    (
        "advantage of the first tokens by route",
        ("mechanism/advantage_first_tokens_short", "mechanism/advantage_first_tokens_long"),
    ),
    (
        "advantage of the first tokens by length quartile",
        tuple(f"mechanism/advantage_first_tokens_q{q}" for q in range(1, 5)),
    ),
    ("critic speed: mean |V after - V before| per step", ("mechanism/critic_speed",)),
    ("actor speed: mean |log p after - log p before| per step", ("mechanism/actor_speed",)),
)


def mean_curve(all_rows: list[list[dict]], stage: str, key: str) -> tuple[list, list]:
    """Mean of ``key`` over several runs' metric rows, at the steps of ``stage`` where every
    run logged it."""
    curves = [dict(zip(*_series(rows, stage, key), strict=True)) for rows in all_rows]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [float(np.mean([c[s] for c in curves])) for s in steps]


def plot_mechanism(runs: dict[str, list[list[dict]]], path: str) -> str | None:
    """runs: label -> metric rows of one or several runs (averaged). One panel per part of the
    collapse condition; a label per run and key. None when no run logged the mechanism."""
    panels = []
    for title, keys in MECHANISM_PANELS:
        series = {}
        for label, all_rows in runs.items():
            for key in keys:
                x, y = mean_curve(all_rows, "ppo", key)
                name = key.split("/")[1].replace("advantage_first_tokens_", "")
                series[label if len(keys) == 1 else f"{label}: {name}"] = (x, y)
        if any(len(x) for x, _ in series.values()):
            panels.append((title, "PPO step", series))
    if not panels:
        return None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return save_panels(path, panels, ncols=3)


def plot_runs(runs: dict[str, str], out_dir: str) -> list[str]:
    """runs: label -> workdir (or metrics.jsonl). Returns the PNG paths written."""
    os.makedirs(out_dir, exist_ok=True)
    data = {label: read_metrics(path) for label, path in runs.items()}
    panels = [
        (title, "PPO step", {label: _series(rows, stage, key) for label, rows in data.items()})
        for key, stage, title in PPO_PANELS
    ]
    written = [save_panels(os.path.join(out_dir, "ppo_curves.png"), panels, ncols=3)]
    mech = plot_mechanism(
        {label: [rows] for label, rows in data.items()}, os.path.join(out_dir, "mechanism.png")
    )
    if mech:
        written.append(mech)
    vp = {k: rows for k, rows in data.items() if any(r["stage"] == "value_pretrain" for r in rows)}
    if vp:
        panels = [
            (
                vp_title(key),
                "value-pretraining step",
                {label: _series(rows, "value_pretrain", key) for label, rows in vp.items()},
            )
            for key in VP_KEYS
        ]
        written.append(save_panels(os.path.join(out_dir, "value_pretraining.png"), panels, 2))
    profiles = {label: load_profile(path) for label, path in runs.items()}
    profiles = {k: v for k, v in profiles.items() if v is not None}
    if profiles:
        panels = [
            (
                f"{PROFILE_TITLES[key]} by position, start of PPO",
                "response token position",
                {label: profile_series(prof, key) for label, prof in profiles.items()},
            )
            for key in profile_keys(profiles.values())
        ]
        written.append(
            save_panels(
                os.path.join(out_dir, "value_advantage_by_position.png"), panels, len(panels)
            )
        )
    return written


def main() -> None:
    """Command line: draws the figures of ``--runs label=workdir ...`` (a bare workdir is labelled
    by its name) into ``--out`` and prints their paths."""
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
