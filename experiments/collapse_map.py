"""Where does PPO collapse? A controlled critic-bias study (the paper's causal claim, tested).

    python -m experiments.collapse_map --out workdirs/collapse_map \\
        [--offsets 0,-1,-2] [--profiles constant] [--num_terms 12] [--lambda_actor 0.95] \\
        [--lr_ratios 3] [--methods ppo,decoupled,vp,vcppo] [--seeds 0,1] [--variant tiny] \\
        [--ppo_steps 20] [--critic_start policy] [--sft_from STUDY_OUT] [--dry_run]

The paper says PPO collapses on long answers because its critic under-values unfinished
prefixes (value initialisation bias) and lambda < 1 starves early tokens of the terminal reward,
and that value pretraining and decoupled GAE fix it. Here the critic's bias is the controlled
variable: ``critic.init_offset`` (constant, or growing with the distance from the end with
``--profiles linear``) is added to the critic when it is set up. With ``--critic_start policy``
(the default) the critic is the SFT policy's backbone with a zero value head, so its initial
value on every prefix is exactly the offset; ``--critic_start reward_model`` starts from the
trained reward model as in the paper (its own, uncontrolled bias is then added to the offset).
The other axes: the answer length (``data.num_terms``), lambda_actor, and the critic-to-actor
learning-rate ratio (``critic.learning_rate = ratio * actor.learning_rate``). Each cell runs
four methods that share every other setting:

  ppo        lambda_critic = lambda_actor, no value pretraining      (the paper's PPO)
  decoupled  lambda_critic = 1.0, no value pretraining               (decoupled GAE only)
  vp         value pretraining from the offset critic, lambda_critic = lambda_actor
  vcppo      value pretraining and lambda_critic = 1.0               (VC-PPO)

Every run is an ordinary ``vcppo_jax.main`` run in ``OUT/runs/<cell>/<method>/seed_N`` (one SFT
policy per seed and chain length, shared by all cells), resumable and skipped once finished, so
the map can be built up over several sessions. Outputs: ``OUT/map.json`` (every run's summary),
``OUT/collapse_table.md`` (where each method collapses) and heat maps
``OUT/figures/{length_ratio,min_length_ratio,final_accuracy}.png``.

A run *collapses* when its mean rollout length falls below ``COLLAPSE_LENGTH_RATIO`` of the
first PPO step's at any point (``min_length_ratio``) and the held-out greedy accuracy at that
point or at the end is below the start's minus ``COLLAPSE_ACCURACY_DROP``; the table also gives
the final/initial length ratio, so a collapse that recovered is visible as such.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np

from configs import common
from experiments import reproduce
from vcppo_jax import plotting
from vcppo_jax.data.synthetic import AdditionTask
from vcppo_jax.metrics import read_metrics

# method -> (config file, flags); lambda_critic follows lambda_actor where it is not 1.
MAP_METHODS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "ppo": (reproduce.PPO, (), "PPO"),
    "decoupled": (reproduce.PPO, ("--config.gae.lambda_critic=1.0",), "decoupled GAE only"),
    "vp": (reproduce.VCPPO, (), "value pretraining only"),
    "vcppo": (reproduce.VCPPO, ("--config.gae.lambda_critic=1.0",), "VC-PPO"),
}
COLLAPSE_LENGTH_RATIO = 0.8
COLLAPSE_ACCURACY_DROP = 0.15


def chain_flags(num_terms: int, variant: str = "tiny") -> tuple[str, ...]:
    """The chain length, room for its written answer and padding of demonstration batches (one
    compiled SFT step per 16 tokens of width). At the variant's own chain length its own
    rollout.max_new_tokens stands; otherwise about 12 tokens a step, or, where the variant's
    format is longer (restated terms), the longest written answer's non-space characters (a
    bound on its tokens: digits are one token each) plus 16."""
    c = common.apply_variant(common.base_config(), variant)
    flags = (f"--config.data.num_terms={num_terms}", "--config.data.pad_multiple=16")
    if num_terms == c.data.num_terms:
        return flags
    task = AdditionTask(num_terms, c.data.digits, c.data.labels, c.data.carry_every)
    longest = task.make([10**c.data.digits - 1] * num_terms).full_solution.replace(" ", "")
    budget = max(12 * num_terms + 16, len(longest) + 16)
    return (*flags, f"--config.rollout.max_new_tokens={budget}")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def cell_name(offset: float, profile: str, num_terms: int, lam: float, ratio: float) -> str:
    return f"off{offset:g}_{profile}_terms{num_terms}_lam{lam:g}_lr{ratio:g}"


def cell_flags(
    method: str, offset: float, profile: str, lam: float, ratio: float, actor_lr: float, start
) -> tuple[str, ...]:
    config, flags, _ = MAP_METHODS[method]
    out = [
        f"--config.critic.init_offset={offset}",
        f"--config.critic.init_offset_profile={profile}",
        f"--config.gae.lambda_actor={lam}",
        f"--config.critic.learning_rate={ratio * actor_lr:.6g}",
    ]
    if "--config.gae.lambda_critic=1.0" not in flags:
        out.append(f"--config.gae.lambda_critic={lam}")
    if config == reproduce.PPO:
        out.append(f"--config.critic.init={start}")
    else:
        out.append(f"--config.value_pretrain.init={start}")
    return (*flags, *out)


def summarise(wd: str) -> dict:
    """Length and accuracy over the run: the collapse measures of one run."""
    rows = read_metrics(wd)
    evals = [r for r in rows if r["stage"] == "eval"]
    ppo = [r for r in rows if r["stage"] == "ppo"]
    if not evals or not ppo:
        raise RuntimeError(f"{wd}: no PPO or evaluation rows")
    lengths = [r["rollout/response_length_mean"] for r in ppo]
    acc = [r["eval/accuracy"] for r in evals]
    out = {
        "length_ratio": lengths[-1] / lengths[0],
        "min_length_ratio": min(lengths) / lengths[0],
        "initial_accuracy": acc[0],
        "final_accuracy": acc[-1],
        "min_accuracy": min(acc),
        "initial_length": lengths[0],
        "final_length": lengths[-1],
        "initial_direct_fraction": ppo[0]["rollout/direct_fraction"],
        "max_direct_fraction": max(r["rollout/direct_fraction"] for r in ppo),
    }
    margin = [r["mechanism/collapse_margin"] for r in ppo if "mechanism/collapse_margin" in r]
    if margin:
        out["initial_collapse_margin"] = margin[0]
    # The trajectory at every evaluation (the per-run table) and the run's wall time.
    out["eval_steps"] = [r["step"] for r in evals]
    out["greedy_accuracy_by_eval"] = acc
    if all("eval/response_length" in r for r in evals):
        out["greedy_length_by_eval"] = [r["eval/response_length"] for r in evals]
    if all("eval/direct_fraction" in r for r in evals):
        out["sampled_direct_share_by_eval"] = [r["eval/direct_fraction"] for r in evals]
    times = [r["time"] for r in rows if "time" in r]
    if len(times) > 1:
        out["minutes"] = (times[-1] - times[0]) / 60
    out["host"] = reproduce.run_host(wd)
    out["collapsed"] = bool(
        out["min_length_ratio"] < COLLAPSE_LENGTH_RATIO
        and out["min_accuracy"] < out["initial_accuracy"] - COLLAPSE_ACCURACY_DROP
    )
    return out


def write_table(results: dict, out: str) -> str:
    """results[cell][method][seed] -> the markdown table of where each method collapses."""
    lines = [
        "Collapse map: final/initial and shortest/initial mean rollout length, held-out greedy "
        "accuracy start -> end (%), and collapsed seeds (length below "
        f"{COLLAPSE_LENGTH_RATIO:g}x the start and accuracy {100 * COLLAPSE_ACCURACY_DROP:g} "
        "points below it at some evaluation); mean over seeds.",
        "",
        "| cell | method | length end/start | length min/start | accuracy | collapsed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cell, per_method in results.items():
        for method, per_seed in per_method.items():
            runs = list(per_seed.values())
            if not runs:
                continue
            mean = lambda k, runs=runs: float(np.mean([r[k] for r in runs]))
            lines.append(
                f"| {cell} | {MAP_METHODS[method][2]} | {mean('length_ratio'):.2f} | "
                f"{mean('min_length_ratio'):.2f} | {100 * mean('initial_accuracy'):.0f} -> "
                f"{100 * mean('final_accuracy'):.0f} | "
                f"{sum(r['collapsed'] for r in runs)}/{len(runs)} |"
            )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "collapse_table.md"), "w") as f:
        f.write(text)
    return text


def write_runs_table(results: dict, out: str) -> str:
    """results[cell][method][seed] -> ``runs_table.md``: every run's held-out greedy accuracy
    and length at each evaluation, the direct share of its sampled answers first -> last, its
    collapse margin at the first PPO step and its minutes."""
    lines = [
        "Every run: held-out greedy accuracy (%) and greedy response length (tokens) at each "
        "evaluation, the direct share of sampled answers (%) at the first -> last evaluation, "
        "the collapse margin (reward_short - value_prefix_short) at the first PPO step, and "
        "the run's wall time.",
        "",
        "| cell | method | seed | eval steps | greedy accuracy (%) | greedy length | "
        "direct share (%) | collapse margin, step 0 | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    join = lambda xs, scale=1.0, fmt="{:.1f}": " / ".join(fmt.format(scale * x) for x in xs)
    for cell, per_method in results.items():
        for method, per_seed in per_method.items():
            for seed, r in per_seed.items():
                length = join(r["greedy_length_by_eval"], fmt="{:.0f}") if (
                    "greedy_length_by_eval" in r) else "n/a"  # fmt: skip
                share = r.get("sampled_direct_share_by_eval")
                share = f"{100 * share[0]:.0f} -> {100 * share[-1]:.0f}" if share else "n/a"
                margin = r.get("initial_collapse_margin")
                margin = "n/a" if margin is None else f"{margin:+.2f}"
                minutes = f"{r['minutes']:.1f}" if "minutes" in r else "n/a"
                lines.append(
                    f"| {cell} | {MAP_METHODS[method][2]} | {seed.removeprefix('seed_')} | "
                    f"{' / '.join(str(s) for s in r['eval_steps'])} | "
                    f"{join(r['greedy_accuracy_by_eval'], 100.0)} | {length} | {share} | "
                    f"{margin} | {minutes} |"
                )
    flat = {f"{c}/{m}": per_seed for c, per_m in results.items() for m, per_seed in per_m.items()}
    lines += ["", reproduce.hosts_line(flat)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "runs_table.md"), "w") as f:
        f.write(text)
    return text


def draw(results: dict, axes: dict, out: str) -> list[str]:
    """One heat map per measure: a panel per method, offset across, the other swept axis down."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    # Rows: every combination of the non-offset axes.
    rest = [(p, n, lam, r) for p in axes["profiles"] for n in axes["num_terms"]
            for lam in axes["lambda_actor"] for r in axes["lr_ratios"]]  # fmt: skip
    row_label = lambda p, n, lam, r: f"{p}, {n} terms, lam {lam:g}, lr x{r:g}"
    written = []
    for key, title, cmap, (lo, hi) in (
        ("length_ratio", "final / initial response length", "RdBu", (0.0, 2.0)),
        ("min_length_ratio", "shortest / initial response length", "RdBu", (0.0, 2.0)),
        ("final_accuracy", "final held-out accuracy", "viridis", (0.0, 1.0)),
    ):
        methods = [m for m in MAP_METHODS if any(m in results.get(c, {}) for c in results)]
        fig, axs = plt.subplots(
            1, len(methods), figsize=(3.2 * len(methods) + 1, 0.5 * len(rest) + 2), squeeze=False
        )
        for ax, method in zip(axs[0], methods, strict=True):
            grid = np.full((len(rest), len(axes["offsets"])), np.nan)
            for i, row in enumerate(rest):
                for j, off in enumerate(axes["offsets"]):
                    runs = results.get(cell_name(off, *row), {}).get(method, {})
                    if runs:
                        grid[i, j] = np.mean([r[key] for r in runs.values()])
            im = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(axes["offsets"])), [f"{o:g}" for o in axes["offsets"]])
            ax.set_yticks(
                range(len(rest)), [row_label(*r) for r in rest] if ax is axs[0][0] else []
            )
            ax.set_xlabel("critic.init_offset")
            ax.set_title(MAP_METHODS[method][2])
        fig.colorbar(im, ax=axs[0].tolist(), shrink=0.8)
        fig.suptitle(title)
        path = os.path.join(fig_dir, f"{key}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def draw_mechanism(runs: dict[str, list[str]], out: str) -> str | None:
    """The mechanism by PPO step for the given runs (label -> workdirs, averaged)."""
    return plotting.plot_mechanism(
        {label: [read_metrics(wd) for wd in wds] for label, wds in runs.items()},
        os.path.join(out, "figures", "mechanism.png"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--offsets", default="0,-1,-2")
    parser.add_argument("--profiles", default="constant", help="constant,linear")
    parser.add_argument("--num_terms", default="12")
    parser.add_argument("--lambda_actor", default="0.95")
    parser.add_argument("--lr_ratios", default="3", help="critic lr / actor lr")
    parser.add_argument("--methods", default=",".join(MAP_METHODS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--ppo_steps", type=int, default=20)
    parser.add_argument("--vp_steps", type=int, default=30)
    parser.add_argument("--eval_every", type=int, default=5)
    parser.add_argument("--eval_prompts", type=int, default=64)
    parser.add_argument("--actor_lr", type=float, default=1e-4)
    parser.add_argument("--critic_start", default="policy", choices=("policy", "reward_model"))
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument(
        "--archive",
        default=None,
        help="folder of committed finished runs (experiments/archive.py): reused, and every "
        "run is copied there when it finishes",
    )
    parser.add_argument(
        "--sft_from",
        default=None,
        help="a study's --out folder (experiments/reproduce.py): at the variant's own chain "
        "length, start from its SFT policy of each seed (OUT/sft/seed_N) instead of training one",
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="run nothing: summarise the finished runs of the grid (a partial map) and draw",
    )
    reproduce.add_set_flag(parser)
    args = parser.parse_args()
    reproduce.set_common_flags(parser, args.set)

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in MAP_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(MAP_METHODS)}")
    bad = [p for p in args.profiles.split(",") if p not in ("constant", "linear")]
    if bad:
        parser.error(f"unknown profiles {bad}; choose from constant, linear")
    axes = {
        "offsets": _floats(args.offsets),
        "profiles": [p for p in args.profiles.split(",") if p],
        "num_terms": [int(x) for x in args.num_terms.split(",") if x],
        "lambda_actor": _floats(args.lambda_actor),
        "lr_ratios": _floats(args.lr_ratios),
    }
    seeds = [int(s) for s in args.seeds.split(",") if s]
    common = (
        f"--config.ppo.steps={args.ppo_steps}",
        f"--config.value_pretrain.steps={args.vp_steps}",
        f"--config.eval.every_steps={args.eval_every}",
        f"--config.eval.num_prompts={args.eval_prompts}",
        "--config.eval.num_samples=2",
        f"--config.actor.learning_rate={args.actor_lr}",
    )
    os.makedirs(args.out, exist_ok=True)
    cells = list(
        itertools.product(
            axes["offsets"], axes["profiles"], axes["num_terms"], axes["lambda_actor"],
            axes["lr_ratios"],
        )
    )  # fmt: skip
    total = len(cells) * len(methods) * len(seeds)
    print(f"[collapse_map] {len(cells)} cells x {len(methods)} methods x {len(seeds)} seeds "
          f"= {total} runs", flush=True)  # fmt: skip
    sft: dict[tuple[int, int], str] = {}
    results: dict = {}
    t0, done = time.time(), 0
    for off, profile, n, lam, ratio in cells:
        cell = cell_name(off, profile, n, lam, ratio)
        terms = chain_flags(n, args.variant)
        for method in methods:
            for seed in seeds:
                if (seed, n) not in sft:
                    sft[(seed, n)] = _sft(args, seed, n)
                wd = os.path.join(args.out, "runs", cell, method, f"seed_{seed}")
                config, _, _ = MAP_METHODS[method]
                flags = cell_flags(method, off, profile, lam, ratio, args.actor_lr,
                                   args.critic_start)  # fmt: skip
                cmd = reproduce._cmd(
                    config, args.variant, wd, seed, *terms, *common, *flags,
                    f"--config.sft.init_from={sft[(seed, n)]}",
                )  # fmt: skip
                if args.report_only:
                    archived = reproduce._archived(args.archive, args.out, wd)
                    if not reproduce.finished(wd, archived, cmd):
                        continue
                else:
                    reproduce._run(
                        f"{cell} {method} seed {seed}", wd, cmd, args.dry_run,
                        reproduce._archived(args.archive, args.out, wd),
                    )  # fmt: skip
                done += 1
                if not args.dry_run:
                    results.setdefault(cell, {}).setdefault(method, {})[f"seed_{seed}"] = summarise(
                        wd
                    )
                    with open(os.path.join(args.out, "map.json"), "w") as f:
                        json.dump({"axes": axes, "results": results}, f, indent=2)
                    rate = (time.time() - t0) / done
                    print(f"[collapse_map] {done}/{total} runs; ETA "
                          f"{rate * (total - done) / 60:.0f} min", flush=True)  # fmt: skip
    if args.dry_run:
        return
    if not results:
        print("[collapse_map] no finished runs to report", flush=True)
        return
    print(write_table(results, args.out))
    write_runs_table(results, args.out)
    for p in draw(results, axes, args.out):
        print(p)
    # The mechanism by step in the most biased cell, per method (its finished runs).
    worst = cell_name(min(axes["offsets"]), *cells[0][1:])
    mech = {
        m: [
            wd
            for s in seeds
            if reproduce.finished(wd := os.path.join(args.out, "runs", worst, m, f"seed_{s}"))
        ]
        for m in methods
    }
    mech = {m: wds for m, wds in mech.items() if wds}
    if mech:
        print(draw_mechanism(mech, args.out))


def _sft(args, seed: int, num_terms: int) -> str:
    own = common.apply_variant(common.base_config(), args.variant).data.num_terms
    if args.sft_from and num_terms == own:  # The study's SFT policy of this seed.
        return os.path.join(args.sft_from, "sft", f"seed_{seed}")
    wd = os.path.join(args.out, "sft", f"terms{num_terms}", f"seed_{seed}")
    if args.report_only:
        return wd
    cmd = reproduce._cmd(
        reproduce.VCPPO, args.variant, wd, seed, *chain_flags(num_terms, args.variant),
        *reproduce.SFT_ONLY,
    )  # fmt: skip
    name = f"SFT terms {num_terms} seed {seed}"
    return reproduce._run(
        name, wd, cmd, args.dry_run, reproduce._archived(args.archive, args.out, wd)
    )


if __name__ == "__main__":
    main()
