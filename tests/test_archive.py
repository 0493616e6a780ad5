"""Finished runs archived in the repository and reused by the drivers (experiments/archive.py)."""

import json
import os
import sys

import pytest

from experiments import archive, reproduce


def _finished_run(wd, metrics="{}\n"):
    os.makedirs(os.path.join(wd, "sft_policy"))
    os.makedirs(os.path.join(wd, "checkpoints"))
    for name, text in (
        ("metrics.jsonl", metrics),
        ("config.json", "{}"),
        ("DONE", "12 s\n"),
        ("checkpoints/big", "x" * 1000),
        ("sft_policy/model.safetensors", "w"),
    ):
        with open(os.path.join(wd, name), "w") as f:
            f.write(text)


def test_save_keeps_the_small_files_and_restore_puts_them_back(tmp_path):
    wd, kept, again = tmp_path / "run", tmp_path / "archive" / "run", tmp_path / "again"
    _finished_run(wd)
    archive.save(str(wd), str(kept))
    assert sorted(os.listdir(kept)) == ["DONE", "config.json", "metrics.jsonl", "sft_policy"]
    assert os.listdir(kept / "sft_policy") == ["model.safetensors"]
    assert archive.restore(str(kept), str(again))
    assert (again / "DONE").read_text() == "12 s\n"
    assert (again / "sft_policy" / "model.safetensors").read_text() == "w"
    # Nothing archived: nothing restored, and the empty workdir stays unfinished.
    assert not archive.restore(str(tmp_path / "none"), str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "empty" / "DONE")
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        archive.save(str(tmp_path / "empty"), str(tmp_path / "archive" / "x"))


def test_driver_reuses_archived_runs_and_archives_new_ones(tmp_path):
    out, arch = tmp_path / "out", tmp_path / "archive"
    _finished_run(arch / "ppo" / "seed_0", metrics='{"archived": 1}\n')
    fail = [sys.executable, "-c", "raise SystemExit(3)"]  # Must not run: the archive has it.
    wd = reproduce._run(
        "ppo", str(out / "ppo" / "seed_0"), fail, False,
        reproduce._archived(str(arch), str(out), str(out / "ppo" / "seed_0")),
    )  # fmt: skip
    assert open(os.path.join(wd, "metrics.jsonl")).read() == '{"archived": 1}\n'
    new = out / "vcppo" / "seed_0"
    write = (
        "import os,sys; d=sys.argv[1]; os.makedirs(d, exist_ok=True); "
        "open(os.path.join(d, 'metrics.jsonl'), 'w').write('{}')"
    )
    reproduce._run(
        "vcppo", str(new), [sys.executable, "-c", write, str(new)], False,
        reproduce._archived(str(arch), str(out), str(new)),
    )  # fmt: skip
    assert (arch / "vcppo" / "seed_0" / "DONE").read_text().endswith(" s\n")
    assert (arch / "vcppo" / "seed_0" / "metrics.jsonl").read_text() == "{}"


def test_config_differences_name_changed_fields_only():
    made = {"sft": {"steps": 1600, "init_from": "a"}, "mesh": {"rules": [["embed", None]]},
            "old_field": 1, "resolved": {"model.attention": "xla"}}  # fmt: skip
    wanted = {"sft": {"steps": 2400, "init_from": "b"}, "mesh": {"rules": (("embed", None),)},
              "new_field": 2}  # fmt: skip
    assert archive.config_differences(made, wanted) == ["sft.steps: archived 1600, asked for 2400"]
    assert archive.config_differences(made, {**wanted, "sft": {"steps": 1600}}) == []


def test_a_field_added_with_a_new_default_compares_as_the_old_behaviour():
    """Runs archived before model.mask_unused_vocab existed ran without the mask: reused
    only when the mask is asked off (the drivers' --set model.mask_unused_vocab=False)."""
    made = {"sft": {"steps": 2400}, "model": {"hidden_size": 64}}
    on = {"sft": {"steps": 2400}, "model": {"hidden_size": 64, "mask_unused_vocab": True}}
    off = {"sft": {"steps": 2400}, "model": {"hidden_size": 64, "mask_unused_vocab": False}}
    assert archive.config_differences(made, on) == [
        "model.mask_unused_vocab: archived False, asked for True"
    ]
    assert archive.config_differences(made, off) == []
    assert archive.config_differences(on, on) == []


def test_the_drivers_set_flag_reaches_every_run(monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    reproduce.add_set_flag(parser)
    args = parser.parse_args(["--set", "model.mask_unused_vocab=False"])
    monkeypatch.setattr(reproduce, "COMMON_FLAGS", [])
    reproduce.set_common_flags(parser, args.set)
    assert "--config.model.mask_unused_vocab=False" in reproduce._cmd("c.py", "long", "w", 0)
    _, cmd = reproduce.method_cmd("out", "ppo", 0, "long", ())
    assert "--config.model.mask_unused_vocab=False" in cmd
    with pytest.raises(SystemExit):
        reproduce.set_common_flags(parser, ["model.mask_unused_vocab"])


def test_an_archived_run_made_under_another_config_is_refused(tmp_path):
    """The driver asks the project for the config its command would run and restores an
    archived run only if that run was made under it; otherwise nothing is copied and the error
    names the field."""
    out, arch = tmp_path / "out", tmp_path / "archive"
    wd = out / "sft" / "seed_0"
    cmd = reproduce._cmd(reproduce.VCPPO, "smoke", str(wd), 0, *reproduce.SFT_ONLY)
    wanted = reproduce.wanted_config(cmd)
    assert wanted["variant"] == "smoke" and wanted["ppo"]["steps"] == 0
    archived = arch / "sft" / "seed_0"
    _finished_run(archived)
    made = json.loads(json.dumps(wanted))
    made["sft"]["steps"] += 1
    (archived / "config.json").write_text(json.dumps(made))
    with pytest.raises(archive.ArchiveMismatch, match=r"sft\.steps: archived \d+, asked for \d+"):
        reproduce.finished(str(wd), str(archived), cmd)
    assert not os.path.exists(wd / "DONE")
    (archived / "config.json").write_text(json.dumps(wanted))
    assert reproduce.finished(str(wd), str(archived), cmd)
    assert (wd / "DONE").exists()


def test_fields_no_stage_of_the_run_reads_are_not_compared():
    """An SFT-only run (the study's per-seed policy) is reused after a change to a stage it
    never ran (value pretraining's start, the reward model, PPO), but not after a change to
    what it did run, nor when the run asked for now would go through other stages."""
    cmd = reproduce._cmd(reproduce.VCPPO, "smoke", "unused", 0, *reproduce.SFT_ONLY)
    sft_only = reproduce.wanted_config(cmd)
    assert archive.unread_fields(sft_only) == (
        "reward_model", "value_pretrain", "ppo", "actor", "gae", "advantage", "critic",
    )  # fmt: skip
    later = json.loads(json.dumps(sft_only))
    later["value_pretrain"]["init"] = "reward_model" if later["value_pretrain"]["init"] != (
        "reward_model") else "policy"  # fmt: skip
    later["reward_model"]["steps"] += 100
    later["ppo"]["epochs"] += 1
    later["critic"]["learning_rate"] *= 2
    assert archive.config_differences(sft_only, later) == []
    later["sft"]["learning_rate"] *= 2
    assert archive.config_differences(sft_only, later) == [
        f"sft.learning_rate: archived {sft_only['sft']['learning_rate']!r}, "
        f"asked for {later['sft']['learning_rate']!r}"
    ]
    # The same change on a run whose critic is pretrained is compared, and a run that plans
    # other stages is named as such.
    vcppo = reproduce.wanted_config(reproduce._cmd(reproduce.VCPPO, "smoke", "unused", 0))
    assert "value_pretrain" in archive.stages_of(vcppo)
    changed = json.loads(json.dumps(vcppo))
    changed["value_pretrain"]["steps"] += 1
    assert [d.split(":")[0] for d in archive.config_differences(vcppo, changed)] == [
        "value_pretrain.steps"
    ]
    assert archive.config_differences(sft_only, vcppo)[0].startswith("stages: archived ['sft'")


@pytest.mark.parametrize("ppo_steps,kept", [(0, True), (30, False)])
def test_a_reward_model_export_is_kept_only_from_a_run_that_stops_before_ppo(
    tmp_path, ppo_steps, kept
):
    wd = tmp_path / "run"
    _finished_run(wd)
    (wd / "config.json").write_text(json.dumps({"ppo": {"steps": ppo_steps}}))
    os.makedirs(wd / "reward_model_export")
    (wd / "reward_model_export" / "params.npz").write_text("w")
    archive.save(str(wd), str(tmp_path / "archive"))
    assert os.path.isdir(tmp_path / "archive" / "reward_model_export") == kept


@pytest.mark.parametrize("run", ["sft/seed_0", "ppo/seed_0", "vcppo/seed_0"])
def test_the_committed_long_study_is_reused_under_todays_config(run, monkeypatch):
    """The README's long-study commands restore the committed runs: each still matches the
    config its command asks for today, so a change of default that alters no run (a logical
    axis given a rule that leaves it replicated, as no rule does) does not make the study run
    again, or stop it."""
    monkeypatch.setattr(reproduce, "COMMON_FLAGS", ["--config.model.mask_unused_vocab=False"])
    arch = "docs/results/study_long_sft2400"
    if run.startswith("sft/"):
        cmd = reproduce._cmd(reproduce.VCPPO, "long", "unused", 0, *reproduce.SFT_ONLY)
    else:
        sft, rm = (os.path.join(arch, stage, "seed_0") for stage in ("sft", "reward_model"))
        _, cmd = reproduce.method_cmd("unused", run.split("/")[0], 0, "long", (), sft, rm)
    with open(os.path.join(arch, run, "config.json")) as f:
        made = json.load(f)
    assert archive.config_differences(made, reproduce.wanted_config(cmd)) == []


def test_rules_compare_by_what_they_place():
    old = [["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["length", None]]
    same = [*old, ["activation_embed", None], ["embed", "tensor"]]  # Flax reads the first.
    assert archive.placement_rules(old) == archive.placement_rules(same)
    assert archive.config_differences({"mesh": {"rules": old}}, {"mesh": {"rules": same}}) == []
    moved = [["batch", ["data", "fsdp"]], ["embed", None], ["embed", "fsdp"]]
    assert archive.config_differences({"mesh": {"rules": old}}, {"mesh": {"rules": moved}}) == [
        f"mesh.rules: archived {old!r}, asked for {moved!r}"
    ]
