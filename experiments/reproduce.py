"""The paper's study in miniature: PPO's collapse vs VC-PPO, the ablations, the lambda sweep.

    python -m experiments.reproduce --out workdirs/study [--quick] [--seeds 0,1,2]
        [--methods ppo,vcppo,...] [--variant tiny] [--dry_run]

Every run is an ordinary ``python -m vcppo_jax.main`` run with its own workdir
(``OUT/METHOD/seed_N``), so any run can be resumed or inspected alone; finished runs are not
repeated. SFT runs once per seed (``OUT/sft/seed_N``) and every method starts from that policy
(``--config.sft.init_from``), sharing every hyper-parameter except the flags that define it.
Then writes ``OUT/summary.json``, ``OUT/ablation.md`` and the figures (``OUT/figures/*.png``).

``--quick`` runs PPO and VC-PPO with 2 seeds (and, for ``tiny``, a shorter PPO stage).
``--variant long`` is the long-CoT regime (~340-token written answers); ``--archive DIR`` keeps
every finished run's small files in DIR (committed) and reuses those found there, so a study
too long for one session is built up over several (experiments/archive.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from experiments import archive
from vcppo_jax import plotting
from vcppo_jax.metrics import read_metrics

VCPPO = "configs/vcppo.py"
PPO = "configs/ppo.py"

# name -> (config file, flag overrides, description)
METHODS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "ppo": (PPO, (), "PPO (critic from reward model, lambda 0.95 / 0.95)"),
    "vcppo": (VCPPO, (), "VC-PPO (value pretraining, lambda_actor 0.95, lambda_critic 1.0)"),
    "vp_only": (
        VCPPO,
        ("--config.gae.lambda_critic=0.95",),
        "value pretraining only (lambda 0.95 / 0.95)",
    ),
    "decoupled_only": (
        PPO,
        ("--config.gae.lambda_critic=1.0",),
        "decoupled GAE only (critic from reward model, no pretraining)",
    ),
    "lambda_actor_0.9": (VCPPO, ("--config.gae.lambda_actor=0.9",), "VC-PPO, lambda_actor 0.9"),
    "lambda_actor_0.99": (VCPPO, ("--config.gae.lambda_actor=0.99",), "VC-PPO, lambda_actor 0.99"),
    "lambda_actor_1.0": (VCPPO, ("--config.gae.lambda_actor=1.0",), "VC-PPO, lambda_actor 1.0"),
    "vp_steps_5": (VCPPO, ("--config.value_pretrain.steps=5",), "VC-PPO, 5 pretraining steps"),
    "vp_steps_120": (
        VCPPO,
        ("--config.value_pretrain.steps=120",),
        "VC-PPO, 120 pretraining steps",
    ),
    "grpo": (
        VCPPO,
        (
            "--config.advantage.estimator=grpo",
            "--config.gae.whiten_advantages=False",
            "--config.rollout.samples_per_prompt=4",
            "--config.rollout.prompts_per_step=8",
            "--config.critic.init=policy",
        ),
        "GRPO (group of 4, no critic)",
    ),
    "vapo_length_adaptive": (
        VCPPO,
        ("--config.gae.length_adaptive_alpha=0.05",),
        "VC-PPO + VAPO length-adaptive lambda_actor",
    ),
    "dapo_clip_higher": (
        VCPPO,
        ("--config.ppo.eps_high=0.28", "--config.ppo.loss_agg_mode=token-mean"),
        "VC-PPO + DAPO clip-higher (0.2 / 0.28), token-level loss",
    ),
}
QUICK_METHODS = ("ppo", "vcppo")
# --quick: a shorter PPO stage where the variant's own is long (`long` is sized to fit as is).
MAX_SEED_LINES = 12  # Runs up to which the length and accuracy figures show each seed too.
QUICK_FLAGS = {"tiny": ("--config.ppo.steps=40", "--config.eval.every_steps=10")}
# The critics that differ at the first PPO step: from the reward model (ppo; decoupled_only has
# the same one), pretrained for 30 steps (vcppo and its variants), for 5 and for 120 steps.
PROFILE_METHODS = ("ppo", "vcppo", "vp_steps_5", "vp_steps_120")
# The methods the mechanism figure draws where present: PPO, VC-PPO and its two parts (its six
# panels hold up to four lines per method, readable for four methods but not for twelve; a
# --report_only run with --methods draws any others).
MECHANISM_METHODS = ("ppo", "vcppo", "vp_only", "decoupled_only")
LAMBDA_ROWS = (
    ("0.9", "lambda_actor_0.9"),
    ("0.95", "vcppo"),
    ("0.99", "lambda_actor_0.99"),
    ("1.0", "lambda_actor_1.0"),
)
PAPER = {"ppo": 5.6, "vp_only": 29.4, "vcppo": 41.9, "grpo": 35.8}
PAPER_LAMBDA = {"0.9": 34.3, "0.95": 41.3, "0.99": 41.9, "1.0": 29.4}


# The SFT-only run of each seed: no critic, no PPO steps; it exports WORKDIR/sft_policy.
SFT_ONLY = (
    "--config.ppo.steps=0",
    "--config.critic.init=policy",
)


# The reward-model-only run of each seed (from its SFT policy; no PPO steps): it exports
# WORKDIR/reward_model_export, which every method of that seed that needs a reward model reads
# (reward_model.init_from) instead of training the same model again.
RM_ONLY = ("--config.ppo.steps=0",)


def _run(name: str, wd: str, cmd: list[str], dry_run: bool, archived: str | None = None) -> str:
    """Runs ``cmd`` unless ``wd`` (or ``archived``, a committed copy: experiments/archive.py)
    holds the finished run; archives it when it finishes. DONE records the run's seconds."""
    done = os.path.join(wd, "DONE")
    if finished(wd, None if dry_run else archived, cmd):
        print(f"[reproduce] {name}: already finished", flush=True)
        return wd
    print(f"[reproduce] {name}: {' '.join(cmd)}", flush=True)
    if dry_run:
        return wd
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(done, "w") as f:
        f.write(f"{time.time() - t0:.0f} s\n")
    print(f"[reproduce] {name}: finished in {(time.time() - t0) / 60:.1f} min", flush=True)
    if archived:
        archive.save(wd, archived)
    return wd


def finished(wd: str, archived: str | None = None, cmd: list[str] | None = None) -> bool:
    """Whether ``wd`` holds a finished run, after restoring it from ``archived`` if given. With
    ``cmd`` (a ``vcppo_jax.main`` command), the archived run must have been made under the
    config that command asks for (``archive.ArchiveMismatch`` otherwise)."""
    if os.path.exists(os.path.join(wd, "DONE")):
        return True
    if not (archived and os.path.isfile(os.path.join(archived, "DONE"))):
        return False
    return archive.restore(archived, wd, wanted_config(cmd) if cmd else None)


def wanted_config(cmd: list[str]) -> dict | None:
    """The resolved config a ``vcppo_jax.main`` command would run (``--validate_only``; a few
    seconds), or None for any other command. A config the project refuses raises."""
    if "vcppo_jax.main" not in cmd:
        return None
    out = subprocess.run([*cmd, "--validate_only"], capture_output=True, text=True)
    if out.returncode != 0:
        raise ValueError(f"{' '.join(cmd)}: the config does not validate:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout[out.stdout.index("{") :])


def _archived(archive_dir: str | None, out: str, wd: str) -> str | None:
    """Where the run in ``wd`` (under ``out``) is kept in the archive folder, if one is used."""
    return os.path.join(archive_dir, os.path.relpath(wd, out)) if archive_dir else None


# ``--set KEY=VALUE`` of the drivers: config overrides of every run they make (SFT, reward
# model, methods), placed before each run's own flags.
COMMON_FLAGS: list[str] = []


def add_set_flag(parser) -> None:
    """The drivers' ``--set KEY=VALUE`` (repeatable)."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override of every run (SFT and reward model included), e.g. "
        "model.mask_unused_vocab=False to reuse or redraw the runs archived before that field "
        "existed; repeatable",
    )


def override_flags(pairs: list[str]) -> list[str]:
    """``--set`` values -> ``--config.KEY=VALUE`` flags; ValueError names a malformed one."""
    flags = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key or key.startswith("-") or " " in key:
            raise ValueError(
                f"--set {pair!r}: expected KEY=VALUE, e.g. model.mask_unused_vocab=False"
            )
        flags.append(f"--config.{key}={value}")
    return flags


def set_common_flags(parser, pairs: list[str]) -> None:
    """``--set`` values -> ``COMMON_FLAGS``; a malformed one is a usage error naming it."""
    try:
        COMMON_FLAGS[:] = override_flags(pairs)
    except ValueError as e:
        parser.error(str(e))


def _cmd(config: str, variant: str, wd: str, seed: int, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vcppo_jax.main",
        f"--config={config}:{variant}",
        f"--workdir={wd}",
        f"--config.seed={seed}",
        *COMMON_FLAGS,
        *flags,
    ]


def train_sft(
    out: str, seed: int, variant: str, dry_run: bool, archive_dir: str | None = None
) -> str:
    """The one SFT policy of a seed that every method starts from."""
    wd = os.path.join(out, "sft", f"seed_{seed}")
    cmd = _cmd(VCPPO, variant, wd, seed, *SFT_ONLY)
    return _run(f"SFT seed {seed}", wd, cmd, dry_run, _archived(archive_dir, out, wd))


def train_reward_model(
    out: str, seed: int, variant: str, dry_run: bool, sft_dir: str, archive_dir: str | None = None
) -> str:
    """The one reward model of a seed (the PPO baseline's, from the seed's SFT policy) that
    every method needing one reads; a method whose flags changed a reward_model.* setting
    would be refused by name (rm_export.py)."""
    wd = os.path.join(out, "reward_model", f"seed_{seed}")
    cmd = _cmd(PPO, variant, wd, seed, *RM_ONLY, f"--config.sft.init_from={sft_dir}")
    return _run(f"reward model seed {seed}", wd, cmd, dry_run, _archived(archive_dir, out, wd))


def method_cmd(
    out: str,
    method: str,
    seed: int,
    variant: str,
    extra: tuple[str, ...],
    sft_dir: str | None = None,
    rm_dir: str | None = None,
) -> tuple[str, list[str]]:
    """(workdir, command) of one method-seed run."""
    config, flags, _ = METHODS[method]
    wd = os.path.join(out, method, f"seed_{seed}")
    init = (f"--config.sft.init_from={sft_dir}",) if sft_dir else ()
    init += (f"--config.reward_model.init_from={rm_dir}",) if rm_dir else ()
    return wd, _cmd(config, variant, wd, seed, *flags, *init, *extra)


def needs_reward_model(methods, variant: str) -> bool:
    """Whether any of ``methods`` trains a reward model (its critic or value pretraining
    starts from one), from the config each would run."""
    for m in methods:
        config, flags, _ = METHODS[m]
        wanted = wanted_config(_cmd(config, variant, "unused", 0, *flags))
        if "reward_model" in (archive.stages_of(wanted) or ()):
            return True
    return False


def run_method(
    out: str,
    method: str,
    seed: int,
    variant: str,
    extra: tuple[str, ...],
    dry_run: bool,
    sft_dir: str | None = None,
    archive_dir: str | None = None,
    rm_dir: str | None = None,
) -> str:
    """One method-seed run, from the seed's SFT policy and reward model where given (a method
    that trains no reward model ignores ``rm_dir``)."""
    wd, cmd = method_cmd(out, method, seed, variant, extra, sft_dir, rm_dir)
    return _run(f"{method} seed {seed}", wd, cmd, dry_run, _archived(archive_dir, out, wd))


BIAS_TOKENS = 5  # Early positions where the paper's value-initialisation bias acts.
MECHANISM_STEPS = 5  # The study summary averages the mechanism over the first PPO steps.
MECHANISM_KEYS = (
    "collapse_margin",
    "advantage_first_tokens_short",
    "advantage_first_tokens_long",
    "critic_speed",
    "actor_speed",
)


def run_host(wd: str) -> str:
    """The numerical environment a run was made on: ``resolved.host.id`` of its config.json
    (``vcppo_jax.workdir.host_record``), ``mixed`` where its resumes.jsonl records a resume
    on another, ``unrecorded`` for a run made before hosts were recorded."""
    try:
        with open(os.path.join(wd, "config.json")) as f:
            host = json.load(f).get("resolved", {}).get("host", {}).get("id")
    except (OSError, json.JSONDecodeError, AttributeError):
        host = None
    if host is None:
        return "unrecorded"
    try:
        with open(os.path.join(wd, "resumes.jsonl")) as f:
            resumes = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        resumes = []
    moved = any(k.startswith("resolved.host.") for r in resumes for k in r.get("changed", {}))
    return "mixed" if moved else host


def summarise_run(wd: str) -> dict:
    rows = read_metrics(wd)
    evals = [r for r in rows if r["stage"] == "eval"]
    if not evals:
        raise RuntimeError(f"{wd}: no evaluation rows")
    out = {
        "initial_response_length": evals[0]["eval/response_length"],
        "final_response_length": evals[-1]["eval/response_length"],
        "initial_accuracy": evals[0]["eval/accuracy"],
        "final_accuracy": evals[-1]["eval/accuracy"],
        "best_accuracy": max(r["eval/accuracy"] for r in evals),
        "host": run_host(wd),
    }
    if "eval/direct_fraction" in evals[0]:  # Share of sampled answers on the short route.
        out["initial_direct_fraction"] = evals[0]["eval/direct_fraction"]
        out["final_direct_fraction"] = evals[-1]["eval/direct_fraction"]
    # The critic's start: the reward model's held-out separation, value pretraining's end.
    rm = [r for r in rows if r["stage"] == "reward_model" and "rm/heldout_accuracy" in r]
    if rm:
        for key in ("accuracy", "accuracy_written", "accuracy_direct"):
            out[f"rm_heldout_{key}"] = rm[-1][f"rm/heldout_{key}"]
    vp = [r for r in rows if r["stage"] == "value_pretrain"]
    if vp:
        out["vp_steps"] = len(vp)
        out["vp_final_value_loss"] = vp[-1]["critic/value_loss"]
        out["vp_final_explained_variance"] = vp[-1]["critic/explained_variance"]
    ppo = [r for r in rows if r["stage"] == "ppo"]
    lengths = [r["rollout/response_length_mean"] for r in ppo]
    if lengths:
        out["min_rollout_length"] = min(lengths)
    # The collapse condition (stages/ppo.py) averaged over the first MECHANISM_STEPS PPO steps.
    for key in MECHANISM_KEYS:
        v = [r[f"mechanism/{key}"] for r in ppo[:MECHANISM_STEPS] if f"mechanism/{key}" in r]
        if v:
            out[f"mechanism_{key}"] = float(np.mean(v))
    prof = plotting.load_profile(wd)
    if prof is not None and "value_minus_return" in prof:
        # The critic at the first PPO step, over the first BIAS_TOKENS response tokens.
        first = lambda key: float(np.mean([x for x in prof[key][:BIAS_TOKENS] if x is not None]))
        out["critic_bias_first_tokens"] = first("value_minus_return")
        out["advantage_first_tokens"] = first("advantage")
    return out


def _mean_std(values, scale: float = 100.0, fmt: str = "{:.1f}", std: bool = True) -> str:
    """Mean (± std over seeds when there are several) of scaled values; percentages by default."""
    v = scale * np.asarray(values, float)
    text = fmt.format(v.mean())
    return text + (f" ± {fmt.format(v.std())}" if std and len(v) > 1 else "")


def write_tables(summary: dict, out: str, seeds) -> str:
    lines = [
        f"Held-out greedy accuracy (%) on the miniature task, mean ± std over the seeds each "
        f"row names (of {list(seeds)}); the paper's AIME 2024 pass@1 (8K context) beside it.",
        "",
        "| method | initial | final | best | final length | paper | seeds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, per_seed in summary.items():
        runs = list(per_seed.values())
        length = np.mean([r["final_response_length"] for r in runs])
        names = ",".join(k.removeprefix("seed_") for k in per_seed)
        lines.append(
            f"| {METHODS[method][2]} | {_mean_std([r['initial_accuracy'] for r in runs])} | "
            f"{_mean_std([r['final_accuracy'] for r in runs])} | "
            f"{_mean_std([r['best_accuracy'] for r in runs])} | {length:.1f} | "
            f"{PAPER.get(method, '')} | {names} |"
        )
    if any(m in summary for _, m in LAMBDA_ROWS[:1] + LAMBDA_ROWS[2:]):
        lines += [
            "",
            "| lambda_actor (lambda_critic 1.0) | final accuracy | paper |",
            "| --- | --- | --- |",
        ]
        for lam, m in LAMBDA_ROWS:
            if m in summary:
                acc = _mean_std([r["final_accuracy"] for r in summary[m].values()])
                lines.append(f"| {lam} | {acc} | {PAPER_LAMBDA[lam]} |")
    runs = {m: list(per_seed.values()) for m, per_seed in summary.items()}
    if any("final_direct_fraction" in r for rs in runs.values() for r in rs):
        lines += [
            "",
            "Collapse signs: share of sampled held-out answers taking the short (direct) route, "
            "the shortest mean rollout length during PPO, and the critic at the first PPO step "
            f"over the first {BIAS_TOKENS} response tokens (value minus Monte Carlo return: "
            "negative = under-valued; mean advantage), mean ± std over seeds.",
            "",
            "| method | direct share, start -> end (%) | shortest rollout length | "
            "critic bias | early advantage |",
            "| --- | --- | --- | --- | --- |",
        ]

        def cell(rs, key, scale=1.0, fmt="{:.2f}", std=True):
            v = [r[key] for r in rs if key in r]
            return _mean_std(v, scale, fmt, std) if v else "n/a"

        for m, rs in runs.items():
            lines.append(
                f"| {METHODS[m][2]} | "
                f"{cell(rs, 'initial_direct_fraction', 100, '{:.1f}', std=False)} -> "
                f"{cell(rs, 'final_direct_fraction', 100, '{:.1f}', std=False)} | "
                f"{cell(rs, 'min_rollout_length', fmt='{:.1f}')} | "
                f"{cell(rs, 'critic_bias_first_tokens')} | {cell(rs, 'advantage_first_tokens')} |"
            )
    if any("rm_heldout_accuracy" in r or "vp_steps" in r for rs in runs.values() for r in rs):
        lines += [
            "",
            "The critic's start: the reward model's held-out separation of right from wrong "
            "answers (%, written / direct route), and value pretraining's steps, final value "
            "loss and explained variance, mean ± std over seeds.",
            "",
            "| method | reward model held-out | written / direct | pretraining steps | "
            "final value loss | final explained variance |",
            "| --- | --- | --- | --- | --- | --- |",
        ]

        def opt(rs, key, scale=1.0, fmt="{:.2f}"):
            v = [r[key] for r in rs if key in r]
            return _mean_std(v, scale, fmt) if v else ""

        for m, rs in runs.items():
            if not any("rm_heldout_accuracy" in r or "vp_steps" in r for r in rs):
                continue  # Nothing to say (e.g. a reward model from before the held-out set).
            written = opt(rs, "rm_heldout_accuracy_written", 100, "{:.0f}")
            direct = opt(rs, "rm_heldout_accuracy_direct", 100, "{:.0f}")
            routes = f"{written} / {direct}" if written else ""
            lines.append(
                f"| {METHODS[m][2]} | {opt(rs, 'rm_heldout_accuracy', 100, '{:.1f}')} | "
                f"{routes} | {opt(rs, 'vp_steps', fmt='{:.0f}')} | "
                f"{opt(rs, 'vp_final_value_loss')} | {opt(rs, 'vp_final_explained_variance')} |"
            )
    lines += ["", hosts_line(summary)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(text)
    return text


def hosts_line(summary: dict) -> str:
    """Which numerical environments the runs of a summary were made on (``run_host``): runs
    of one config repeat bit for bit within one, and may part after tens of steps across two."""
    count: dict[str, int] = {}
    for per_seed in summary.values():
        for r in per_seed.values():
            count[r.get("host", "unrecorded")] = count.get(r.get("host", "unrecorded"), 0) + 1
    known = sorted(h for h in count if h not in ("unrecorded", "mixed"))
    parts = [f"`{h}` ({count[h]} runs)" for h in known]
    if "mixed" in count:
        parts.append(f"resumed on another host ({count['mixed']} runs)")
    if "unrecorded" in count:
        parts.append(f"unrecorded ({count['unrecorded']} runs, made before hosts were recorded)")
    return (
        f"Hosts (`resolved.host.id` in each run's config.json; runs repeat bit for bit only on "
        f"one): {len(known)} recorded; " + ", ".join(parts) + "."
    )


def per_run_series(
    runs: dict[str, list[str]], metrics: dict[str, list[list[dict]]], methods, stage: str, key: str
) -> dict[str, tuple[list, list]]:
    """Each run's curve of ``key`` in ``stage``, labelled ``METHOD seed N``, for ``methods``."""
    return {
        f"{m} {os.path.basename(wd).replace('_', ' ')}": plotting.mean_curve([rows], stage, key)
        for m in methods
        for wd, rows in zip(runs[m], metrics[m], strict=True)
    }


def draw(out: str, runs: dict[str, list[str]]) -> list[str]:
    """Figures averaged over seeds: one line per method."""
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    metrics = {m: [read_metrics(wd) for wd in wds] for m, wds in runs.items()}

    written = []
    mech_shown = [m for m in MECHANISM_METHODS if m in metrics] or list(metrics)
    mech = plotting.plot_mechanism(
        {m: metrics[m] for m in mech_shown}, os.path.join(fig_dir, "mechanism.png")
    )
    if mech:
        written.append(mech)
    for key, stage, title, fname in (
        ("rollout/response_length_mean", "ppo", "response length (tokens)", "response_length.png"),
        ("eval/accuracy", "eval", "held-out accuracy (greedy)", "eval_accuracy.png"),
    ):
        series = {m: plotting.mean_curve(rows, stage, key) for m, rows in metrics.items()}
        panels = [(f"{title}, mean over seeds", "PPO step", series)]
        n_runs = sum(len(wds) for wds in runs.values())
        if n_runs <= MAX_SEED_LINES and any(len(wds) > 1 for wds in runs.values()):
            # Seeds can go opposite ways (a mean hides it): each run too, beside the mean.
            per_run = per_run_series(runs, metrics, runs, stage, key)
            panels.append((f"{title}, each seed", "PPO step", per_run))
        path = os.path.join(fig_dir, fname)
        written.append(plotting.save_panels(path, panels, ncols=len(panels)))

    profiles = {
        m: [p for p in (plotting.load_profile(wd) for wd in wds) if p is not None]
        for m, wds in runs.items()
    }

    def mean_profile(m, key):
        profs = profiles[m]
        if not profs:
            return [], []
        n = min(len(p[key]) for p in profs)
        pts = [(i, [p[key][i] for p in profs if p[key][i] is not None]) for i in range(n)]
        pts = [(i, float(np.mean(v))) for i, v in pts if v]
        return [p[0] for p in pts], [p[1] for p in pts]

    # One line per distinct critic: the other methods share one of these critics at step 0.
    shown = [m for m in PROFILE_METHODS if m in runs] or list(runs)
    keys = plotting.profile_keys([p for m in shown for p in profiles[m]])
    panels = [
        (
            f"{plotting.PROFILE_TITLES[key]} by position, first PPO step",
            "response token position",
            {m: mean_profile(m, key) for m in shown},
        )
        for key in keys
    ]
    written.append(
        plotting.save_panels(
            os.path.join(fig_dir, "value_advantage_by_position.png"), panels, ncols=len(panels)
        )
    )

    vp = [  # Methods whose pretraining differs (the rest repeat vcppo's exactly).
        m
        for m, rows in metrics.items()
        if (m in shown or shown == list(runs))
        and any(r["stage"] == "value_pretrain" for r in rows[0])
    ]
    if vp:  # Each run: the plateau rule stops seeds apart, and a mean ends at the shortest.
        panels = [
            (
                plotting.vp_title(key),
                "value-pretraining step",
                per_run_series(runs, metrics, vp, "value_pretrain", key),
            )
            for key in plotting.VP_KEYS
        ]
        written.append(
            plotting.save_panels(os.path.join(fig_dir, "value_pretraining.png"), panels, ncols=2)
        )
    return written


def finished_runs(
    out: str,
    methods,
    seeds,
    variant: str,
    extra: tuple[str, ...],
    archive_dir: str | None,
    runs_out: str | None = None,
) -> dict[str, dict[int, str]]:
    """``--report_only``: method -> seed -> workdir of each run that has finished (in ``out``
    or, made under the config its command asks for, in the archive); nothing is run. Method
    runs are looked for under ``runs_out`` when given (``--ppo_steps``), SFT and reward models
    under ``out``. A run archived under another config is left out and named, as is one that
    has not finished."""
    found: dict[str, dict[int, str]] = {}
    for m in methods:
        for s in seeds:
            sft_dir = os.path.join(out, "sft", f"seed_{s}")
            rm_dir = os.path.join(out, "reward_model", f"seed_{s}")
            wd, cmd = method_cmd(runs_out or out, m, s, variant, extra, sft_dir, rm_dir)
            try:
                done = finished(wd, _archived(archive_dir, out, wd), cmd)
            except archive.ArchiveMismatch as e:
                print(
                    f"[reproduce] {m} seed {s}: archived under another config, left out: {e}",
                    flush=True,
                )
                continue
            if done:
                found.setdefault(m, {})[s] = wd
            else:
                print(f"[reproduce] {m} seed {s}: not finished, left out", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default=None, help="comma-separated; default 0,1,2")
    parser.add_argument("--methods", default=None, help=f"comma-separated from {list(METHODS)}")
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="tables and figures from the runs that have finished (here or in --archive); "
        "runs nothing, and says which runs are left out",
    )
    parser.add_argument(
        "--archive",
        default=None,
        help="folder of committed finished runs (experiments/archive.py): reused, and every "
        "run is copied there when it finishes",
    )
    parser.add_argument(
        "--ppo_steps",
        type=int,
        default=None,
        help="PPO steps of every method run (ppo.steps), from the same SFT policies and reward "
        "models; the runs, tables and figures go to OUT/ppo_steps_N/",
    )
    add_set_flag(parser)
    args = parser.parse_args()
    set_common_flags(parser, args.set)

    methods = (
        args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else METHODS)
    )
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
    extra = QUICK_FLAGS.get(args.variant, ()) if args.quick else ()
    runs_out = args.out
    if args.ppo_steps is not None:
        if args.ppo_steps < 1:
            parser.error(f"--ppo_steps must be an integer >= 1, not {args.ppo_steps}")
        extra += (f"--config.ppo.steps={args.ppo_steps}",)
        runs_out = os.path.join(args.out, f"ppo_steps_{args.ppo_steps}")
    # Method runs are archived as they lie under OUT (ARCHIVE/ppo_steps_N/METHOD/seed_S).
    runs_archive = args.archive and os.path.join(args.archive, os.path.relpath(runs_out, args.out))
    os.makedirs(runs_out, exist_ok=True)
    if args.report_only:
        runs = finished_runs(args.out, methods, seeds, args.variant, extra, args.archive, runs_out)
    else:
        sft = {s: train_sft(args.out, s, args.variant, args.dry_run, args.archive) for s in seeds}
        with_rm = needs_reward_model(methods, args.variant)
        rm = {
            s: (
                train_reward_model(args.out, s, args.variant, args.dry_run, sft[s], args.archive)
                if with_rm
                else None
            )
            for s in seeds
        }
        runs = {
            m: {
                s: run_method(
                    runs_out, m, s, args.variant, extra, args.dry_run, sft[s], runs_archive, rm[s]
                )
                for s in seeds
            }
            for m in methods
        }
    if args.dry_run:
        return
    if not runs:
        raise SystemExit("[reproduce] no finished runs to report")
    summary = {
        m: {f"seed_{s}": summarise_run(wd) for s, wd in per_seed.items()}
        for m, per_seed in runs.items()
    }
    runs = {m: list(per_seed.values()) for m, per_seed in runs.items()}
    with open(os.path.join(runs_out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(write_tables(summary, runs_out, seeds))
    for p in draw(runs_out, runs):
        print(p)


if __name__ == "__main__":
    main()
