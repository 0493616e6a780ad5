"""The study driver: commands, summaries, tables and figures (on synthetic metric files)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_driver(tmp_path, *flags):
    """``python -m experiments.reproduce --out=tmp_path FLAGS``, checked to exit 0; its stdout."""
    out = subprocess.run(
        [sys.executable, "-m", "experiments.reproduce", f"--out={tmp_path}", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def fake_run(wd, acc0, acc1, len0, len1, with_vp):
    os.makedirs(wd, exist_ok=True)
    rows = []
    if not with_vp:
        rows += [
            {"step": 0, "stage": "reward_model", "rm/loss": 0.5},
            {
                "step": 1,
                "stage": "reward_model",
                "rm/heldout_accuracy": 0.75,
                "rm/heldout_accuracy_written": 0.9,
                "rm/heldout_accuracy_direct": 0.6,
            },
        ]
    if with_vp:
        rows += [
            {
                "step": s,
                "stage": "value_pretrain",
                "critic/value_loss": 1 / (1 + s),
                "critic/explained_variance": s / 10,
            }
            for s in range(3)
        ]
    rows += [
        {
            "step": 0,
            "stage": "eval",
            "eval/accuracy": acc0,
            "eval/response_length": len0,
            "eval/direct_fraction": 0.3,
        }
    ]
    rows += [
        {
            "step": s,
            "stage": "ppo",
            "rollout/response_length_mean": len0 + s,
            "mechanism/collapse_margin": 0.1 * s,
            "mechanism/critic_speed": 0.2,
        }
        for s in range(4)
    ]
    rows += [
        {
            "step": 2,
            "stage": "eval",
            "eval/accuracy": max(acc0, acc1) + 0.05,
            "eval/response_length": len1,
        },
        {
            "step": 4,
            "stage": "eval",
            "eval/accuracy": acc1,
            "eval/response_length": len1,
            "eval/direct_fraction": 0.1,
        },
    ]
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(wd, "position_profile.json"), "w") as f:
        json.dump(
            {
                "value": [0.1, 0.2, None],
                "return": [0.5, 0.0, None],
                "advantage": [0.0, 0.4, None],
                "count": [2, 1, 0],
            },
            f,
        )


def test_summary_tables_and_figures(tmp_path):
    out = str(tmp_path)
    runs = {}
    for method, vp in (("ppo", False), ("vcppo", True), ("lambda_actor_0.9", True)):
        runs[method] = []
        for seed in (0, 1):
            wd = os.path.join(out, method, f"seed_{seed}")
            fake_run(wd, 0.4, 0.6 + 0.1 * seed, 30.0, 20.0 + seed, vp)
            runs[method].append(wd)
    s = reproduce.summarise_run(runs["ppo"][1])
    assert s == pytest.approx(
        {
            "initial_response_length": 30.0,
            "final_response_length": 21.0,
            "initial_accuracy": 0.4,
            "final_accuracy": 0.7,
            "best_accuracy": 0.75,
            "initial_direct_fraction": 0.3,
            "final_direct_fraction": 0.1,
            "min_rollout_length": 30.0,
            "critic_bias_first_tokens": -0.1,  # Mean of (0.1 - 0.5, 0.2 - 0.0).
            "advantage_first_tokens": 0.2,
            "mechanism_collapse_margin": 0.15,  # Mean over the logged PPO steps (0, .1, .2, .3).
            "mechanism_critic_speed": 0.2,
            "rm_heldout_accuracy": 0.75,
            "rm_heldout_accuracy_written": 0.9,
            "rm_heldout_accuracy_direct": 0.6,
            "host": "unrecorded",  # No config.json with a host (a run from before they were).
        }
    )
    # The host a run was made on, and a run resumed on another host.
    for wd in runs["vcppo"]:
        with open(os.path.join(wd, "config.json"), "w") as f:
            json.dump({"resolved": {"host": {"id": "abc123", "cpu": "x"}}}, f)
    with open(os.path.join(runs["vcppo"][1], "resumes.jsonl"), "w") as f:
        f.write(json.dumps({"changed": {"resolved.host.cpu": ["y", "x"]}}) + "\n")
    assert reproduce.run_host(runs["vcppo"][0]) == "abc123"
    assert reproduce.run_host(runs["vcppo"][1]) == "mixed"
    s = reproduce.summarise_run(runs["vcppo"][0])
    assert s["vp_steps"] == 3 and s["vp_final_value_loss"] == pytest.approx(1 / 3)
    assert s["vp_final_explained_variance"] == pytest.approx(0.2) and "rm_heldout_accuracy" not in s
    summary = {
        m: {f"seed_{i}": reproduce.summarise_run(wd) for i, wd in enumerate(wds)}
        for m, wds in runs.items()
    }
    text = reproduce.write_tables(summary, out, [0, 1])
    assert "| 65.0 ± 5.0 |" in text and "| 5.6 | 0,1 |" in text  # Final; the paper's PPO; seeds.
    assert "| 0.9 | 65.0 ± 5.0 | 34.3 |" in text
    assert text.rstrip().endswith(
        "1 recorded; `abc123` (1 runs), resumed on another host (1 runs), "
        "unrecorded (4 runs, made before hosts were recorded)."
    )
    assert "| 75.0 ± 0.0 | 90 ± 0 / 60 ± 0 |  |  |  |" in text  # PPO: the reward model.
    assert "|  |  | 3 ± 0 | 0.33 ± 0.00 | 0.20 ± 0.00 |" in text  # VC-PPO: pretraining.
    assert (
        "| 30.0 -> 10.0 | 30.0 ± 0.0 | -0.10 ± 0.00 | 0.20 ± 0.00 |" in text
    )  # Direct share, length, critic.
    figs = reproduce.draw(out, runs)
    assert sorted(os.path.basename(f) for f in figs) == [
        "eval_accuracy.png",
        "mechanism.png",
        "response_length.png",
        "value_advantage_by_position.png",
        "value_pretraining.png",
    ]


def test_dry_run_prints_one_ordinary_command_per_run(tmp_path):
    stdout = run_driver(tmp_path, "--quick", "--dry_run")
    cmds = [line for line in stdout.splitlines() if "vcppo_jax.main" in line]
    # One SFT run and one reward-model run per seed, then PPO and VC-PPO for 2 seeds.
    assert len(cmds) == 8
    sft, rm, runs = cmds[:2], cmds[2:4], cmds[4:]
    assert all("--config.ppo.steps=0" in c and "/sft/seed_" in c for c in sft)
    for c in rm:  # The PPO baseline's reward model, from the seed's SFT policy.
        seed = c.split("--config.seed=")[1].split()[0]
        assert "configs/ppo.py:tiny" in c and "--config.ppo.steps=0" in c
        assert f"--workdir={tmp_path}/reward_model/seed_{seed}" in c
        assert f"--config.sft.init_from={tmp_path}/sft/seed_{seed}" in c
    assert all("--config.ppo.steps=40" in c for c in runs)
    assert any("configs/ppo.py:tiny" in c and "seed_1" in c for c in runs)
    for c in runs:  # Every method starts from its seed's SFT policy.
        seed = c.split("--config.seed=")[1].split()[0]
        assert f"--config.sft.init_from={tmp_path}/sft/seed_{seed}" in c
        assert f"--config.reward_model.init_from={tmp_path}/reward_model/seed_{seed}" in c


def test_no_reward_model_is_trained_where_no_method_needs_one(tmp_path):
    stdout = run_driver(tmp_path, "--methods=grpo", "--seeds=0", "--dry_run")
    cmds = [line for line in stdout.splitlines() if "vcppo_jax.main" in line]
    assert len(cmds) == 2 and "/reward_model/seed_" not in stdout  # SFT, then GRPO.


def test_long_quick_uses_the_variant_as_sized(tmp_path):
    stdout = run_driver(tmp_path, "--quick", "--variant=long", "--dry_run")
    runs = [line for line in stdout.splitlines() if "vcppo_jax.main" in line][4:]
    assert len(runs) == 4 and all(":long" in c for c in runs)
    assert not any("--config.ppo.steps=" in c for c in runs)


def test_report_only_tables_what_has_finished_and_runs_nothing(tmp_path):
    for method, seed in (("ppo", 0), ("ppo", 1), ("vcppo", 1)):
        wd = os.path.join(tmp_path, method, f"seed_{seed}")
        fake_run(wd, 0.4, 0.6 + 0.1 * seed, 30.0, 20.0, method == "vcppo")
        open(os.path.join(wd, "DONE"), "w").close()
    os.makedirs(os.path.join(tmp_path, "vcppo", "seed_0"))  # Started, not finished.
    stdout = run_driver(tmp_path, "--quick", "--report_only")
    assert "vcppo seed 0: not finished, left out" in stdout
    assert "vcppo_jax.main" not in stdout and not os.path.exists(tmp_path / "sft")
    table = open(tmp_path / "ablation.md").read()
    assert "| 5.6 | 0,1 |" in table and "| 41.9 | 1 |" in table  # The seeds each row holds.
    with open(tmp_path / "summary.json") as f:
        assert list(json.load(f)["vcppo"]) == ["seed_1"]


def test_report_only_names_an_archived_run_it_cannot_reuse_and_reports_the_rest(tmp_path):
    out, arch = tmp_path / "out", tmp_path / "archive"
    wd = os.path.join(out, "ppo", "seed_0")
    fake_run(wd, 0.4, 0.6, 30.0, 20.0, False)
    open(os.path.join(wd, "DONE"), "w").close()
    bad = arch / "vcppo" / "seed_0"  # Finished, but its config cannot be checked.
    fake_run(str(bad), 0.4, 0.7, 30.0, 20.0, True)
    (bad / "config.json").write_text("{not json")
    open(bad / "DONE", "w").close()
    stdout = run_driver(out, "--quick", "--seeds=0", f"--archive={arch}", "--report_only")
    assert "vcppo seed 0: archived under another config, left out" in stdout
    assert "config.json cannot be read" in stdout
    assert not os.path.exists(out / "vcppo" / "seed_0")  # Nothing copied from that run.
    with open(out / "summary.json") as f:
        assert list(json.load(f)) == ["ppo"]


def test_ppo_steps_runs_every_method_longer_from_the_same_policies_and_reward_models(tmp_path):
    stdout = run_driver(tmp_path, "--quick", "--seeds=0", "--ppo_steps=60", "--dry_run")
    cmds = [line for line in stdout.splitlines() if "vcppo_jax.main" in line]
    sft, rm, runs = cmds[0], cmds[1], cmds[2:]
    assert f"--workdir={tmp_path}/sft/seed_0" in sft and "ppo.steps=60" not in sft
    assert f"--workdir={tmp_path}/reward_model/seed_0" in rm and "ppo.steps=60" not in rm
    assert len(runs) == 2
    for c in runs:  # The last ppo.steps flag wins over --quick's 40.
        assert c.split("--config.ppo.steps=")[-1].split()[0] == "60"
        assert f"--workdir={tmp_path}/ppo_steps_60/" in c
        assert f"--config.sft.init_from={tmp_path}/sft/seed_0" in c
        assert f"--config.reward_model.init_from={tmp_path}/reward_model/seed_0" in c
    # The report reads the longer runs and writes beside them.
    wd = os.path.join(tmp_path, "ppo_steps_60", "ppo", "seed_0")
    fake_run(wd, 0.4, 0.6, 30.0, 20.0, False)
    open(os.path.join(wd, "DONE"), "w").close()
    fake_run(os.path.join(tmp_path, "ppo", "seed_0"), 0.4, 0.9, 30.0, 20.0, False)
    open(os.path.join(tmp_path, "ppo", "seed_0", "DONE"), "w").close()  # Another study's.
    stdout = run_driver(tmp_path, "--quick", "--seeds=0", "--ppo_steps=60", "--report_only")
    assert "vcppo seed 0: not finished, left out" in stdout
    with open(tmp_path / "ppo_steps_60" / "summary.json") as f:
        assert list(json.load(f)) == ["ppo"]
    assert not os.path.exists(tmp_path / "summary.json")
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.reproduce", f"--out={tmp_path}", "--ppo_steps=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "--ppo_steps must be an integer >= 1, not 0" in bad.stderr


def test_figures_draw_each_seeds_pretraining_and_the_core_methods_mechanism(tmp_path, monkeypatch):
    runs = {}
    for method, vp in (("ppo", False), ("vcppo", True), ("lambda_actor_0.9", True)):
        runs[method] = []
        for seed in (0, 1):
            wd = os.path.join(tmp_path, method, f"seed_{seed}")
            fake_run(wd, 0.4, 0.6, 30.0, 20.0, vp)
            runs[method].append(wd)
    # Seed 1's pretraining ran two more steps (the plateau rule stops seeds apart).
    with open(os.path.join(runs["vcppo"][1], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    extra = [dict(rows[2], step=s, **{"critic/value_loss": 0.1 * s}) for s in (3, 4)]
    with open(os.path.join(runs["vcppo"][1], "metrics.jsonl"), "w") as f:
        for r in rows[:3] + extra + rows[3:]:
            f.write(json.dumps(r) + "\n")
    metrics = {m: [reproduce.read_metrics(wd) for wd in wds] for m, wds in runs.items()}
    series = reproduce.per_run_series(
        runs, metrics, ["vcppo"], "value_pretrain", "critic/value_loss"
    )
    assert list(series) == ["vcppo seed 0", "vcppo seed 1"]
    assert series["vcppo seed 0"][0] == [0, 1, 2] and series["vcppo seed 1"][0] == [0, 1, 2, 3, 4]
    assert series["vcppo seed 1"][1][-1] == pytest.approx(0.4)
    drawn = {}
    real = reproduce.plotting.plot_mechanism
    monkeypatch.setattr(
        reproduce.plotting,
        "plot_mechanism",
        lambda rs, path: drawn.setdefault("methods", list(rs)) and real(rs, path),
    )
    reproduce.draw(str(tmp_path), runs)
    assert drawn["methods"] == ["ppo", "vcppo"]  # Not lambda_actor_0.9: not a core method.
    drawn.clear()
    reproduce.draw(str(tmp_path), {"lambda_actor_0.9": runs["lambda_actor_0.9"]})
    assert drawn["methods"] == ["lambda_actor_0.9"]  # No core method asked for: what was.
