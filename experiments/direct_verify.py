"""Can a reward model verify a bare answer? Held-out accuracy on the direct route by chain length.

    python -m experiments.direct_verify --out workdirs/direct_verify [--terms 2,3,4,6,8,14] \
        [--steps 2000] [--seed 0] [--min-terms 0] [--set model.num_layers=4 ...]

A bare answer ("Answer: 57") off by 1-9 from the right sum differs from it in the last digit,
so verifying it needs the sum of every term's last digit modulo 10: knowing all the terms but
one says nothing about it (only the answer's size is a weak cue). For each number of terms this
trains the ``long`` variant's reward model (``configs/ppo.py:long``: its model, batch and
learning rate) on bare answers only (``reward_model.direct_fraction=1.0``), by default from a
random backbone (``reward_model.init=random``, no SFT), with an ordinary ``vcppo_jax.main`` run
per length, and reads its held-out report (64 problems never trained on, each answered right
and wrong on the direct route). ``--min-terms`` trains on chains of min_terms..terms terms
(``reward_model.min_terms``, a curriculum by mixing) while the held-out set stays at the full
length. ``--set FIELD=VALUE`` overrides a field for every run (the last value of a field wins:
``--set sft.steps=1000 --set reward_model.init=policy`` starts each reward model from an SFT
policy of its own length); give each setting its own ``--out``, as workdirs are named by
length, seed and ``--min-terms`` only. A run already finished is read back (its workdir resumes
from its checkpoints like any run). Writes ``OUT/direct_verify.json``, ``OUT/direct_verify.md``
and the curves in ``OUT/direct_verify.png`` (``direct_verify_min_M.*`` with ``--min-terms M``)
after every length; ``--figure-from SUMMARY.json ...`` draws one figure from saved summaries
and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

from experiments import reproduce
from vcppo_jax.metrics import read_metrics


def run_one(out: str, terms: int, steps: int, seed: int, min_terms: int, sets: list[str]) -> dict:
    name = f"terms_{terms}_seed_{seed}" + (f"_min_{min_terms}" if min_terms else "")
    wd = os.path.join(out, name)
    cmd = [
        sys.executable,
        "-m",
        "vcppo_jax.main",
        "--config=configs/ppo.py:long",
        f"--workdir={wd}",
        f"--config.seed={seed}",
        f"--config.data.num_terms={terms}",
        "--config.model.mask_unused_vocab=False",
        "--config.sft.steps=0",
        "--config.ppo.steps=0",
        "--config.reward_model.init=random",
        "--config.reward_model.direct_fraction=1.0",
        f"--config.reward_model.steps={steps}",
        f"--config.reward_model.eval_every={max(1, steps // 8)}",
        f"--config.reward_model.min_terms={min_terms}",
        *reproduce.override_flags(sets),  # After the sweep's own flags, so they win.
    ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    every = read_metrics(wd)
    rows = [r for r in every if r["stage"] == "reward_model"]
    evals = [r for r in rows if "rm/heldout_accuracy_direct" in r]
    if not evals:
        raise SystemExit(f"error: {wd} logged no held-out evaluation of its reward model")
    tail = rows[-max(1, len(rows) // 5) :]
    # With an SFT stage (--set sft.steps=N), its policy's greedy accuracy with the direct route
    # forced: how well the backbone the reward model starts from answers bare.
    sft_evals = [r for r in every if r["stage"] == "eval"]
    policy_direct = sft_evals[-1].get("eval/accuracy_greedy_direct_route") if sft_evals else None
    return {
        "terms": terms,
        "min_terms": min_terms,
        "seed": seed,
        "steps": len(rows),
        "sets": list(sets),
        "workdir": wd,
        # Every training problem is new, so the training accuracy is out-of-sample too.
        "train_accuracy_last_fifth": sum(r["rm/accuracy"] for r in tail) / len(tail),
        "train_loss_last_fifth": sum(r["rm/loss"] for r in tail) / len(tail),
        "policy_greedy_direct": policy_direct,
        "heldout_direct": evals[-1]["rm/heldout_accuracy_direct"],
        "heldout_direct_pairs": evals[-1]["rm/heldout_pair_accuracy_direct"],
        "heldout_direct_best": max(r["rm/heldout_accuracy_direct"] for r in evals),
        "curve": [
            {
                "step": r["step"] + 1,
                "heldout_direct": r["rm/heldout_accuracy_direct"],
                "heldout_direct_pairs": r["rm/heldout_pair_accuracy_direct"],
            }
            for r in evals
        ],
    }


def lengths(r: dict) -> str:
    """The chain lengths a run trained on: "14", or "2-14" for a curriculum."""
    return f"{r['min_terms']}-{r['terms']}" if r["min_terms"] else str(r["terms"])


def table(results: list[dict]) -> str:
    pct = lambda v: f"{100 * v:.1f}%"
    lines = [
        "| terms | trained on | steps | training accuracy (last fifth) | held-out direct: sign "
        "/ pair (end) | best held-out sign | SFT policy, direct route forced |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['terms']} | {lengths(r)} | {r['steps']} | "
            f"{pct(r['train_accuracy_last_fifth'])} | "
            f"{pct(r['heldout_direct'])} / {pct(r['heldout_direct_pairs'])} | "
            f"{pct(r['heldout_direct_best'])} | "
            f"{'-' if r.get('policy_greedy_direct') is None else pct(r['policy_greedy_direct'])} |"
        )
    return "\n".join(lines)


def label(r: dict) -> str:
    return f"{lengths(r)} terms, {r['steps']} steps"


def sets_of(summary: dict) -> list[str]:
    """The ``--set`` overrides of a saved summary, read back from its command line (for
    summaries written before each result recorded its own ``sets``)."""
    words = shlex.split(summary.get("command", ""))
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--set"]


def plot(results: list[dict], path: str) -> str:
    """Held-out direct-route accuracy (by sign and by pair) against reward-model step, one line
    per run, one row of panels per set of ``--set`` overrides (what the reward model starts
    from)."""
    from vcppo_jax.plotting import save_panels

    groups: dict[tuple[str, ...], list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r.get("sets", [])), []).append(r)

    def series(rs: list[dict], key: str):
        return {
            label(r): ([c["step"] for c in r["curve"]], [c[key] for c in r["curve"]]) for r in rs
        }

    panels = []
    for sets, rs in groups.items():
        start = ", ".join(sets) if sets else "a random backbone"
        for key, what in (("heldout_direct", "sign"), ("heldout_direct_pairs", "pair")):
            panels.append((f"direct route, {what} accuracy\nfrom {start}", "reward-model step",
                           series(rs, key)))  # fmt: skip
    return save_panels(path, panels, ncols=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--terms", default="2,3,4,6,8,14")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-terms", type=int, default=0)
    reproduce.add_set_flag(parser)
    parser.add_argument(
        "--figure-from",
        nargs="+",
        metavar="JSON",
        help="draw OUT/direct_verify.png from these saved summaries and run nothing",
    )
    args = parser.parse_args()
    try:
        reproduce.override_flags(args.set)
    except ValueError as e:
        parser.error(str(e))
    if args.figure_from:
        results = []
        for path in args.figure_from:
            try:
                with open(path) as f:
                    summary = json.load(f)
                for r in summary["results"]:
                    r.setdefault("sets", sets_of(summary))
                    results.append(r)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise SystemExit(f"error: {path} is not a direct_verify summary: {e}") from e
        os.makedirs(args.out, exist_ok=True)
        print(plot(results, os.path.join(args.out, "direct_verify.png")))
        return
    try:
        terms = [int(t) for t in args.terms.split(",")]
    except ValueError as e:
        raise SystemExit(
            f"error: --terms must be comma-separated integers; got {args.terms!r}"
        ) from e
    if any(t < 2 for t in terms) or args.steps < 1:
        raise SystemExit("error: every --terms value must be >= 2 and --steps >= 1")
    if args.min_terms and not all(2 <= args.min_terms <= t for t in terms):
        raise SystemExit(
            f"error: --min-terms must be in [2, each of --terms]; got {args.min_terms}"
        )
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(
        args.out, "direct_verify" + (f"_min_{args.min_terms}" if args.min_terms else "")
    )
    results = []
    for t in terms:
        results.append(run_one(args.out, t, args.steps, args.seed, args.min_terms, args.set))
        # Written after every length, so an interrupted sweep keeps what it measured.
        with open(stem + ".json", "w") as f:
            json.dump(
                {
                    "command": " ".join(["python -m experiments.direct_verify", *sys.argv[1:]]),
                    "results": results,
                },
                f,
                indent=2,
            )
        with open(stem + ".md", "w") as f:
            f.write(table(results) + "\n")
        plot(results, stem + ".png")
    print(table(results))


if __name__ == "__main__":
    main()
