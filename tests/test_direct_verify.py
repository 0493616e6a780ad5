"""experiments/direct_verify.py: the runs it asks for and the numbers it reads back."""

import json
import os
import subprocess
import sys

import pytest

from experiments import direct_verify


def _fake_run(rows_by_workdir, calls):
    def run(cmd, check, stdout):
        calls.append(cmd)
        wd = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
        os.makedirs(wd, exist_ok=True)
        with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
            for row in rows_by_workdir(wd):
                f.write(json.dumps(row) + "\n")
        return subprocess.CompletedProcess(cmd, 0)

    return run


def _rows(n, heldout):
    rows = []
    for step in range(n):
        row = {"step": step, "stage": "reward_model", "rm/accuracy": step / n, "rm/loss": 0.5}
        if (step + 1) % 5 == 0:
            row["rm/heldout_accuracy_direct"] = heldout[(step + 1) // 5 - 1]
            row["rm/heldout_pair_accuracy_direct"] = 1 - heldout[(step + 1) // 5 - 1]
        rows.append(row)
    return rows


def test_a_sweep_runs_one_direct_only_reward_model_per_length_and_reads_its_report(
    tmp_path, monkeypatch
):
    calls = []
    curves = {"terms_2_seed_0": [0.6, 0.9], "terms_5_seed_0": [0.55, 0.5]}
    monkeypatch.setattr(
        direct_verify.subprocess,
        "run",
        _fake_run(lambda wd: _rows(10, curves[os.path.basename(wd)]), calls),
    )
    out = tmp_path / "dv"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "direct_verify",
            "--out",
            str(out),
            "--terms",
            "2,5",
            "--steps",
            "10",
            "--set",
            "model.num_layers=4",
        ],
    )
    direct_verify.main()
    assert len(calls) == 2
    for cmd, terms in zip(calls, (2, 5), strict=True):
        assert f"--config.data.num_terms={terms}" in cmd
        assert "--config.reward_model.direct_fraction=1.0" in cmd
        assert "--config.reward_model.init=random" in cmd
        assert "--config.reward_model.steps=10" in cmd
        assert "--config.model.num_layers=4" in cmd
    results = json.loads((out / "direct_verify.json").read_text())["results"]
    assert [r["terms"] for r in results] == [2, 5]
    assert results[0]["heldout_direct"] == 0.9 and results[0]["heldout_direct_best"] == 0.9
    assert results[0]["heldout_direct_pairs"] == pytest.approx(0.1)
    assert results[1]["heldout_direct"] == 0.5 and results[1]["heldout_direct_best"] == 0.55
    # The last fifth of 10 steps: steps 8 and 9, training accuracy 0.8 and 0.9.
    assert results[0]["train_accuracy_last_fifth"] == pytest.approx(0.85)
    assert [c["step"] for c in results[0]["curve"]] == [5, 10]
    table = (out / "direct_verify.md").read_text()
    assert "| 2 | 2 | 10 | 85.0% | 90.0% / 10.0% | 90.0% | - |" in table
    assert (out / "direct_verify.png").stat().st_size > 0
    # One figure from saved summaries, running nothing; a file that is not one is named.
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "direct_verify",
            "--out",
            str(tmp_path / "fig"),
            "--figure-from",
            str(out / "direct_verify.json"),
        ],
    )
    direct_verify.main()
    assert len(calls) == 2 and (tmp_path / "fig" / "direct_verify.png").exists()
    (tmp_path / "bad.json").write_text("{}")
    monkeypatch.setattr(
        sys,
        "argv",
        ["direct_verify", "--out", str(tmp_path), "--figure-from", str(tmp_path / "bad.json")],
    )
    with pytest.raises(SystemExit, match="bad.json is not a direct_verify summary"):
        direct_verify.main()


def test_a_curriculum_names_its_workdir_and_lengths(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        direct_verify.subprocess, "run", _fake_run(lambda wd: _rows(5, [0.7]), calls)
    )
    r = direct_verify.run_one(str(tmp_path), 14, 5, 1, 2, [])
    assert r["workdir"].endswith("terms_14_seed_1_min_2")
    assert "--config.reward_model.min_terms=2" in calls[0]
    assert "| 14 | 2-14 | 5 |" in direct_verify.table([r])


def test_a_run_without_a_heldout_report_is_an_error(tmp_path, monkeypatch):
    rows = [{"step": 0, "stage": "reward_model", "rm/accuracy": 0.5, "rm/loss": 0.5}]
    monkeypatch.setattr(direct_verify.subprocess, "run", _fake_run(lambda wd: rows, []))
    with pytest.raises(SystemExit, match="no held-out evaluation"):
        direct_verify.run_one(str(tmp_path), 3, 1, 0, 0, [])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--terms", "2,x"], "comma-separated integers"),
        (["--terms", "1"], ">= 2"),
        (["--steps", "0"], ">= 2 and --steps >= 1"),
        (["--terms", "4,8", "--min-terms", "5"], "--min-terms must be in"),
    ],
)
def test_bad_flags_are_refused_by_name(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["direct_verify", "--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit) as e:
        direct_verify.main()
    assert message in str(e.value)


def test_with_an_sft_stage_the_policys_direct_route_accuracy_is_reported(tmp_path, monkeypatch):
    def rows(wd):
        sft_eval = {"step": 0, "stage": "eval", "eval/accuracy_greedy_direct_route": 0.375}
        return [sft_eval, *_rows(5, [0.9])]

    calls = []
    monkeypatch.setattr(direct_verify.subprocess, "run", _fake_run(rows, calls))
    r = direct_verify.run_one(
        str(tmp_path), 6, 5, 0, 0, ["sft.steps=100", "reward_model.init=policy"]
    )
    # The overrides come after the sweep's own settings, so they win.
    assert calls[0][-2:] == ["--config.sft.steps=100", "--config.reward_model.init=policy"]
    assert r["policy_greedy_direct"] == 0.375 and r["steps"] == 5
    assert direct_verify.table([r]).splitlines()[-1].endswith("| 90.0% | 37.5% |")


def test_the_figure_groups_runs_by_their_overrides_old_summaries_included(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_verify.subprocess, "run", _fake_run(lambda wd: _rows(5, [0.7]), []))
    r = direct_verify.run_one(str(tmp_path), 4, 5, 0, 0, ["reward_model.init=policy"])
    assert r["sets"] == ["reward_model.init=policy"]
    # A summary written before results recorded their overrides: read from its command.
    old = {"command": "python -m experiments.direct_verify --out x --set a.b=1 --set c.d=2"}
    assert direct_verify.sets_of(old) == ["a.b=1", "c.d=2"]
    assert direct_verify.sets_of({"command": "python -m experiments.direct_verify"}) == []
    drawn = []

    def save_panels(path, panels, ncols):
        drawn.extend(panels)
        return path

    import vcppo_jax.plotting

    monkeypatch.setattr(vcppo_jax.plotting, "save_panels", save_panels)
    plain = {**r, "sets": []}
    direct_verify.plot([r, plain, {**r, "terms": 6}], str(tmp_path / "f.png"))
    # Two starts, each a row of two panels (sign, pair), each panel its own runs only.
    assert len(drawn) == 4
    assert "from reward_model.init=policy" in drawn[0][0]
    assert "from a random backbone" in drawn[2][0]
    assert list(drawn[0][2]) == ["4 terms, 5 steps", "6 terms, 5 steps"]
    assert list(drawn[2][2]) == ["4 terms, 5 steps"]


def test_a_malformed_set_is_a_usage_error_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        direct_verify.subprocess, "run", lambda *a, **k: pytest.fail("nothing should run")
    )
    monkeypatch.setattr(sys, "argv", ["direct_verify", "--out", str(tmp_path), "--set", "a.b"])
    with pytest.raises(SystemExit):
        direct_verify.main()
    assert "--set 'a.b': expected KEY=VALUE" in capsys.readouterr().err
