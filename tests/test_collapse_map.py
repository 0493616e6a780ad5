"""The collapse-map driver: commands per cell, run summaries, the table and heat maps (on
synthetic metric files)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import collapse_map as cm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(wd, lengths, accs, margin=0.5):
    os.makedirs(wd, exist_ok=True)
    rows = [
        {
            "step": s,
            "stage": "ppo",
            "rollout/response_length_mean": n,
            "rollout/direct_fraction": 0.2 + 0.1 * s,
            "mechanism/collapse_margin": margin - 0.1 * s,
            "mechanism/critic_speed": 0.1,
        }
        for s, n in enumerate(lengths)
    ]
    rows += [{"step": 2 * s, "stage": "eval", "eval/accuracy": a} for s, a in enumerate(accs)]
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_summary_flags_a_collapse_only_when_length_and_accuracy_both_fall(tmp_path):
    fake_run(tmp_path / "a", [100, 60, 90, 100], [0.9, 0.5, 0.85])
    s = cm.summarise(str(tmp_path / "a"))
    assert s["length_ratio"] == pytest.approx(1.0)
    assert s["min_length_ratio"] == pytest.approx(0.6)
    assert s["min_accuracy"] == pytest.approx(0.5)
    assert s["max_direct_fraction"] == pytest.approx(0.5)
    assert s["initial_collapse_margin"] == pytest.approx(0.5)
    assert s["collapsed"]  # Recovered by the end, but it did collapse on the way.
    assert s["eval_steps"] == [0, 2, 4] and s["greedy_accuracy_by_eval"] == [0.9, 0.5, 0.85]
    assert "minutes" not in s and "greedy_length_by_eval" not in s  # Not in these rows.
    fake_run(tmp_path / "b", [100, 60, 90], [0.9, 0.85, 0.9])  # Shorter, not worse.
    assert not cm.summarise(str(tmp_path / "b"))["collapsed"]
    fake_run(tmp_path / "c", [100, 95, 90], [0.9, 0.3, 0.3])  # Worse, not shorter.
    assert not cm.summarise(str(tmp_path / "c"))["collapsed"]


def test_table_and_heat_maps(tmp_path):
    axes = {
        "offsets": [0.0, -2.0],
        "profiles": ["constant"],
        "num_terms": [12],
        "lambda_actor": [0.95],
        "lr_ratios": [3.0],
    }
    results, runs = {}, {}
    for off in axes["offsets"]:
        cell = cm.cell_name(off, "constant", 12, 0.95, 3.0)
        for method in ("ppo", "vcppo"):
            for seed in (0, 1):
                wd = str(tmp_path / cell / method / f"seed_{seed}")
                short = off < 0 and method == "ppo"
                fake_run(wd, [100, 40 if short else 100, 100], [0.9, 0.2 if short else 0.9, 0.9])
                results.setdefault(cell, {}).setdefault(method, {})[f"seed_{seed}"] = cm.summarise(
                    wd
                )
                runs.setdefault(method, []).append(wd)
    text = cm.write_table(results, str(tmp_path))
    assert "| off-2_constant_terms12_lam0.95_lr3 | PPO | 1.00 | 0.40 | 90 -> 90 | 2/2 |" in text
    assert "| off-2_constant_terms12_lam0.95_lr3 | VC-PPO | 1.00 | 1.00 | 90 -> 90 | 0/2 |" in text
    assert "| off0_constant_terms12_lam0.95_lr3 | PPO | 1.00 | 1.00 | 90 -> 90 | 0/2 |" in text
    runs_text = cm.write_runs_table(results, str(tmp_path))
    assert (
        "| off-2_constant_terms12_lam0.95_lr3 | PPO | 1 | 0 / 2 / 4 | 90.0 / 20.0 / 90.0 | n/a | "
        "n/a | +0.50 | n/a |" in runs_text
    )
    assert runs_text == open(os.path.join(tmp_path, "runs_table.md")).read()
    assert "unrecorded (8 runs, made before hosts were recorded)." in runs_text  # No config.json.
    figs = cm.draw(results, axes, str(tmp_path))
    assert sorted(os.path.basename(f) for f in figs) == [
        "final_accuracy.png",
        "length_ratio.png",
        "min_length_ratio.png",
    ]
    assert all(os.path.getsize(f) > 0 for f in figs)
    assert os.path.basename(cm.draw_mechanism(runs, str(tmp_path))) == "mechanism.png"


def test_cell_flags_define_the_four_methods():
    flags = {m: cm.cell_flags(m, -1.0, "linear", 0.9, 3.0, 1e-4, "policy") for m in cm.MAP_METHODS}
    for m, f in flags.items():
        assert "--config.critic.init_offset=-1.0" in f
        assert "--config.critic.init_offset_profile=linear" in f
        assert "--config.critic.learning_rate=0.0003" in f
        assert "--config.gae.lambda_actor=0.9" in f
        lam_c = "1.0" if m in ("decoupled", "vcppo") else "0.9"
        assert f"--config.gae.lambda_critic={lam_c}" in f, (m, f)
        assert sum(x.startswith("--config.gae.lambda_critic") for x in f) == 1
    assert "--config.critic.init=policy" in flags["ppo"]
    assert "--config.value_pretrain.init=policy" in flags["vcppo"]


def test_dry_run_one_sft_per_seed_and_chain_length(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.collapse_map", f"--out={tmp_path}", "--dry_run",
         "--offsets=0,-2", "--num_terms=8,12", "--methods=ppo,vcppo"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    cmds = [line for line in out.stdout.splitlines() if "vcppo_jax.main" in line]
    sft = [c for c in cmds if c.startswith("[reproduce] SFT")]
    assert len(sft) == 4 and len(cmds) == 4 + 2 * 2 * 2 * 2
    for c in cmds:
        if c not in sft:
            terms = c.split("--config.data.num_terms=")[1].split()[0]
            seed = c.split("--config.seed=")[1].split()[0]
            assert f"/sft/terms{terms}/seed_{seed}" in c  # Its own chain length's SFT policy.
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.collapse_map", f"--out={tmp_path}", "--dry_run",
         "--methods=ppo,nope"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "unknown methods ['nope']" in bad.stderr


def test_long_chains_get_room_for_their_answers_and_reuse_the_study_sft(tmp_path):
    from vcppo_jax.data.synthetic import AdditionTask

    assert cm.chain_flags(14, "long") == (
        "--config.data.num_terms=14",
        "--config.data.pad_multiple=16",
    )  # The variant's own length: its own max_new_tokens.
    flags = cm.chain_flags(30, "long")
    budget = int(flags[-1].split("=")[1])
    longest = AdditionTask(30, 1, True, 1).make([9] * 30).full_solution
    assert budget > len(longest.replace(" ", "")) and budget >= 12 * 30 + 16
    assert cm.chain_flags(7) == (
        "--config.data.num_terms=7",
        "--config.data.pad_multiple=16",
        "--config.rollout.max_new_tokens=100",
    )  # As the committed map's runs had it.
    out = subprocess.run(
        [sys.executable, "-m", "experiments.collapse_map", f"--out={tmp_path}", "--dry_run",
         "--variant=long", "--num_terms=14", "--offsets=-2", "--methods=ppo",
         "--seeds=0", "--sft_from=workdirs/study_long"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    cmds = [line for line in out.stdout.splitlines() if "vcppo_jax.main" in line]
    assert len(cmds) == 1 and "--config.sft.init_from=workdirs/study_long/sft/seed_0" in cmds[0]
