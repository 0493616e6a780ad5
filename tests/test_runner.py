"""End-to-end runs of the real entry point on the smoke config: every stage, resume, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_cmd(workdir, *flags, config="configs/vcppo.py:smoke"):
    return [
        sys.executable,
        "-m",
        "vcppo_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *flags,
    ]


def run_main(workdir, *flags, config="configs/vcppo.py:smoke", timeout=600):
    return subprocess.run(
        main_cmd(workdir, *flags, config=config),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(rs):
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rs]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("full"))
    out = run_main(wd)
    assert out.returncode == 0, out.stderr[-3000:]
    return wd, out


def test_smoke_run_writes_metrics_checkpoints_and_config(full_run):
    wd, out = full_run
    rs = rows(wd)
    stages = [r["stage"] for r in rs]
    assert stages[:6] == ["sft"] * 6
    assert stages.count("value_pretrain") == 3 and stages.count("ppo") == 3
    # VC-PPO's critic comes from value pretraining, which starts from the reward model.
    assert stages.count("reward_model") == 3
    assert stages.index("reward_model") < stages.index("value_pretrain")
    ppo = [r for r in rs if r["stage"] == "ppo"]
    for key in (
        "rollout/response_length_mean",
        "rollout/accuracy",
        "critic/explained_variance",
        "actor/clip_fraction",
        "gae/advantage_mean",
        "perf/sample_tokens_per_s",
        "perf/train_tokens_per_s",
        "rollout/sampler_logprob_max_diff",
    ):
        assert key in ppo[0], key
    # The sampler's old log-probs agree with the trainer's forward.
    assert max(r["rollout/sampler_logprob_max_diff"] for r in ppo) < 1e-4
    evals = [r for r in rs if r["stage"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3] and "eval/accuracy" in evals[0]
    assert os.listdir(os.path.join(wd, "checkpoints"))
    with open(os.path.join(wd, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["experiment"] == "vcppo"
    assert recorded["resolved"]["model.attention"] == "xla"  # What "auto" would resolve.
    host = recorded["resolved"]["host"]  # The numerical environment it ran on.
    assert host["backend"] == jax.default_backend() and host["jax"] == jax.__version__
    assert len(host["id"]) == 12
    with open(os.path.join(wd, "position_profile.json")) as f:
        prof = json.load(f)
    assert set(prof) == {"count", "value", "advantage", "return"}
    # Each response's return is its final reward (gamma 1): -1 or +1 wherever a row is live.
    assert all(x is None or -1 <= x <= 1 for x in prof["return"])
    # First-token value and advantage by route, for whichever routes were sampled.
    for r in ppo:
        routes = [k for k in r if k.startswith("gae/advantage_first_token_")]
        assert routes and set(routes) <= {
            "gae/advantage_first_token_direct",
            "gae/advantage_first_token_written",
        }
    assert os.listdir(os.path.join(wd, "tensorboard"))
    assert "[ppo] step 3/3" in out.stderr and "ETA" in out.stderr


def test_resume_ends_exactly_like_an_uninterrupted_run(full_run, tmp_path):
    wd_full, _ = full_run
    wd = str(tmp_path / "resumed")
    # 6 SFT and 3 reward-model steps, then stops inside value pretraining.
    first = run_main(wd, "--config.stop_after_steps=11")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped (stop_after_steps) after value_pretrain step 2" in first.stderr
    second = run_main(wd)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint" in second.stderr
    assert comparable(rows(wd)) == comparable(rows(wd_full))
    # A third start on a finished workdir trains nothing more and says so.
    third = run_main(wd)
    assert third.returncode == 0
    assert comparable(rows(wd)) == comparable(rows(wd_full))


def test_checkpoint_from_another_config_is_refused(full_run, tmp_path):
    wd_full, _ = full_run
    with open(os.path.join(wd_full, "config.json")) as f:
        before = f.read()
    out = run_main(wd_full, "--config.model.hidden_size=48", "--config.model.num_heads=2")
    assert out.returncode != 0
    assert "model.hidden_size: checkpoint has 32, config has 48" in out.stderr
    with open(os.path.join(wd_full, "config.json")) as f:  # Still the config it ran under.
        assert f.read() == before


def test_changed_fields_on_resume_are_listed_and_recorded(full_run, tmp_path):
    import shutil

    wd = str(tmp_path / "copy")
    shutil.copytree(full_run[0], wd)
    assert not os.path.exists(os.path.join(wd, "resumes.jsonl"))
    out = run_main(wd, "--config.gae.lambda_actor=0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gae.lambda_actor: 0.95 -> 0.5" in out.stderr
    with open(os.path.join(wd, "resumes.jsonl")) as f:
        (record,) = [json.loads(line) for line in f]
    assert record["changed"] == {"gae.lambda_actor": [0.95, 0.5]}
    assert record["resumed_at"] == "done step 0"
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["gae"]["lambda_actor"] == 0.5


def test_a_stop_on_the_last_step_keeps_the_final_evaluation(full_run, tmp_path):
    """The final evaluation runs before the checkpoint that ends PPO, so a run stopped on its
    last step (6 + 3 + 3 + 3 steps) has it, and its resume has nothing left to do."""
    wd = str(tmp_path / "stopped")
    first = run_main(wd, "--config.stop_after_steps=15")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped (stop_after_steps) after ppo step 3" in first.stderr
    assert comparable(rows(wd)) == comparable(rows(full_run[0]))
    again = run_main(wd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert comparable(rows(wd)) == comparable(rows(full_run[0]))


def test_a_finished_stage_is_not_given_another_step_count(full_run, tmp_path):
    wd = str(tmp_path / "copy")
    shutil.copytree(full_run[0], wd)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        before = f.read()
    out = run_main(wd, "--config.ppo.steps=6")
    assert out.returncode == 1, out.stderr[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert "ppo: finished at 3 steps, now asked for 6" in line and "new --workdir" in line
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        assert f.read() == before


def test_a_finished_run_without_checkpoints_is_refused(full_run, tmp_path):
    """A study driver's finished run (DONE) restored from an archive keeps no checkpoints:
    running it again would retrain and overwrite its results."""
    wd = str(tmp_path / "archived")
    shutil.copytree(full_run[0], wd, ignore=shutil.ignore_patterns("checkpoints"))
    with open(os.path.join(wd, "DONE"), "w") as f:
        f.write("12 s\n")
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        before = f.read()
    out = run_main(wd)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "holds a finished run (DONE) but no checkpoint" in out.stderr
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        assert f.read() == before


def test_rows_of_an_unsaved_attempt_and_a_torn_line_are_dropped(full_run, tmp_path):
    """A run killed before its first checkpoint (and mid-line) leaves rows that a rerun, which
    starts from scratch, writes again: they must not stay twice."""
    wd = str(tmp_path / "killed")
    os.makedirs(wd)
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        for s in range(3):
            f.write(json.dumps({"step": s, "stage": "sft", "time": 0.0, "sft/loss": 9.0}) + "\n")
        f.write('{"step": 3, "stage": "sf')  # Torn.
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        before = f.read()
    out = run_main(wd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dropping a torn last line" in out.stderr
    # What was there is kept beside the file, in case it is all that is left of a run.
    assert "kept in" in out.stderr and "metrics.jsonl.unsaved-1" in out.stderr
    with open(os.path.join(wd, "metrics.jsonl.unsaved-1")) as f:
        assert f.read() == before
    assert comparable(rows(wd)) == comparable(rows(full_run[0]))


def test_a_locked_workdir_is_refused_at_once(tmp_path):
    from vcppo_jax.workdir import WorkdirLock

    wd = str(tmp_path / "locked")
    os.makedirs(wd)
    with WorkdirLock(wd):
        out = run_main(wd, timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "is in use by host" in last and "pid" in last
    assert "Traceback" not in out.stderr
    assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))


@pytest.mark.parametrize(
    "kernel, cure",
    [
        ("splash", "use auto, blockwise or cudnn"),
        pytest.param(
            "cudnn",
            "use auto, blockwise or xla",
            marks=pytest.mark.skipif(
                jax.default_backend() == "gpu", reason="cuDNN's kernel runs on this GPU"
            ),
        ),
    ],
)
def test_an_attention_kernel_this_backend_lacks_is_refused_at_once(tmp_path, kernel, cure):
    """The Pallas TPU kernel (whose interpret mode is for tests only), or cuDNN's, asked for
    on a CPU: one error line naming the cure, before any training."""
    wd = str(tmp_path / kernel)
    out = run_main(wd, f"--config.model.attention={kernel}", timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"model.attention='{kernel}'" in last
    assert cure in last and "Traceback" not in out.stderr
    assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))


def test_unusable_workdirs_and_data_files_end_in_one_line(tmp_path):
    """A workdir that is a file, and an empty or non-UTF-8 prompt file: one ``error:`` line
    naming the path, exit 1, no traceback unless --verbosity=1 asks for it."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00{}\n")
    # Math prompts have no reward-model data: value pretraining starts from the policy.
    math = [
        "--config.data.task=math",
        f"--config.model.hf_path={tmp_path}",
        "--config.value_pretrain.init=policy",
    ]
    cases = [
        ((str(afile),), f"--workdir {afile}: exists and is not a directory"),
        ((str(tmp_path / "a"), *math, f"--config.data.train_files={empty}"), f"{empty}: holds no"),
        ((str(tmp_path / "b"), *math, f"--config.data.train_files={binary}"), f"{binary}: not UTF"),
    ]
    for (wd, *flags), want in cases:
        out = run_main(wd, *flags, timeout=120)
        assert out.returncode == 1, out.stderr[-2000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {want}"), out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    out = run_main(str(afile), "--verbosity=1", timeout=120)
    assert out.returncode == 1 and "Traceback" in out.stderr and "WorkdirError" in out.stderr


@pytest.mark.slow
def test_a_failed_save_ends_in_one_line_and_the_rerun_resumes_intact(full_run, tmp_path):
    """A real write failure in the middle of a checkpoint (files capped at 100 kB by
    RLIMIT_FSIZE, as a full disk fails a write): one error line naming the step and cause,
    exit 1; the previous checkpoint stays usable and the rerun ends as an uninterrupted run."""
    import resource

    wd = str(tmp_path / "full_disk")
    first = run_main(wd, "--config.stop_after_steps=8")
    assert first.returncode == 0, first.stderr[-3000:]

    def cap_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # A failed write, not a killed process.
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    capped = subprocess.run(
        main_cmd(wd),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=cap_file_size,
    )
    assert capped.returncode == 1, capped.stderr[-3000:]
    errors = [line for line in capped.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "(File too large)" in errors[0], capped.stderr[-3000:]
    assert "saving checkpoint step 5 in" in errors[0] and "checkpoint step 4 is intact" in errors[0]
    rerun = run_main(wd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from checkpoint 4" in rerun.stderr
    assert comparable(rows(wd)) == comparable(rows(full_run[0]))


def test_sigterm_saves_a_checkpoint_and_resume_finishes(full_run, tmp_path):
    wd_full, _ = full_run
    wd = str(tmp_path / "term")
    proc = subprocess.Popen(
        main_cmd(wd), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline:  # Wait until training has started.
        if os.path.exists(os.path.join(wd, "metrics.jsonl")) and rows(wd):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped (SIGTERM)" in err
    out = run_main(wd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert comparable(rows(wd)) == comparable(rows(wd_full))


def test_ppo_baseline_trains_a_reward_model_and_starts_the_critic_from_it(full_run, tmp_path):
    wd = str(tmp_path / "ppo")
    out = run_main(wd, config="configs/ppo.py:smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    stages = [r["stage"] for r in rows(wd)]
    assert stages.count("reward_model") == 3 and "value_pretrain" not in stages
    rm = [r for r in rows(wd) if r["stage"] == "reward_model"]
    assert "rm/heldout_accuracy" not in rm[1]  # Held-out scores after the last step only here.
    assert {"rm/heldout_accuracy_written", "rm/heldout_accuracy_direct"} <= set(rm[2])
    # Both ways of reading a response's score are logged; the unprefixed ones follow
    # reward_model.score (EOS by default).
    for key in ("accuracy", "accuracy_written", "accuracy_direct", "margin"):
        assert rm[2][f"rm/heldout_{key}"] == rm[2][f"rm/heldout_last_token_{key}"]
        assert f"rm/heldout_min_{key}" in rm[2]
    assert 0.0 <= rm[2]["rm/heldout_pair_accuracy"] <= 1.0
    # Re-scored from the finished run's checkpoint (experiments/rm_heldout.py): the logged
    # numbers again, from a copy, the run's own files untouched.
    from experiments import rm_heldout

    before = open(os.path.join(wd, "metrics.jsonl")).read()
    again = rm_heldout.score(wd)
    for k, v in rm[2].items():
        if k.startswith("rm/heldout"):
            assert again[k] == pytest.approx(v, abs=1e-6), k
    assert open(os.path.join(wd, "metrics.jsonl")).read() == before

    # Starting from another run's SFT policy (the VC-PPO run: same seed, model, task and SFT
    # settings) skips SFT and then runs exactly as if SFT had been trained here.
    wd_shared = str(tmp_path / "ppo_shared")
    out = run_main(
        wd_shared, f"--config.sft.init_from={full_run[0]}", config="configs/ppo.py:smoke"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    not_sft = lambda rs: [r for r in comparable(rs) if r["stage"] != "sft"]
    assert [r["stage"] for r in rows(wd_shared)].count("sft") == 0
    assert not_sft(rows(wd_shared)) == not_sft(rows(wd))

    # A shared reward model (reward_model.init_from): the VC-PPO run exported the one it
    # trained (same seed, SFT and reward_model.* settings as this baseline's), and a run reading
    # it logs the same reward-model rows, then the same PPO rows, as one training its own. One
    # trained under other settings, a directory without one, or a corrupt export is refused.
    shared = (f"--config.sft.init_from={full_run[0]}",)
    own, adopted = wd_shared, str(tmp_path / "adopted")
    export = os.path.join(full_run[0], "reward_model_export")
    assert {"params.npz", "fingerprint.json", "metrics.jsonl"} <= set(os.listdir(export))
    # Read from a copy, stopped after one PPO step; the copy is then deleted and the run
    # resumes past the reward-model stage without it (the checkpoint holds the model).
    copy = str(tmp_path / "rm_copy")
    shutil.copytree(full_run[0], copy, ignore=shutil.ignore_patterns("checkpoints"))
    adopt = lambda *flags: run_main(
        adopted, *shared, f"--config.reward_model.init_from={copy}", *flags,
        config="configs/ppo.py:smoke",
    )  # fmt: skip
    out = adopt("--config.stop_after_steps=1")
    assert out.returncode == 0 and "stopped (stop_after_steps)" in out.stderr, out.stderr[-3000:]
    assert "3 logged rows adopted" in out.stderr
    shutil.rmtree(copy)
    out = adopt()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from checkpoint" in out.stderr and "rows adopted" not in out.stderr
    assert comparable(rows(adopted)) == comparable(rows(own))
    assert not os.path.exists(os.path.join(adopted, "reward_model_export"))  # Not re-exported.
    # A run stopped part-way through training its own reward model, then resumed with
    # reward_model.init_from, drops what it had trained and reads the export.
    partial = str(tmp_path / "partial")
    out = run_main(partial, *shared, "--config.stop_after_steps=1", config="configs/ppo.py:smoke")
    assert out.returncode == 0 and "stopped (stop_after_steps)" in out.stderr, out.stderr[-3000:]
    out = run_main(
        partial,
        *shared,
        f"--config.reward_model.init_from={full_run[0]}",
        config="configs/ppo.py:smoke",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert comparable(rows(partial)) == comparable(rows(own))

    refused = lambda *flags: run_main(
        str(tmp_path / "refused"), *shared, *flags, config="configs/ppo.py:smoke"
    )
    out = refused(
        f"--config.reward_model.init_from={export}", "--config.reward_model.learning_rate=0.5"
    )
    assert out.returncode != 0
    assert "reward_model.learning_rate: checkpoint has 0.001, config has 0.5" in out.stderr
    out = refused(f"--config.reward_model.init_from={tmp_path}")
    assert out.returncode != 0 and "no finished reward model there" in out.stderr
    assert "written when a run's reward_model stage ends" in out.stderr
    broken = str(tmp_path / "broken")
    shutil.copytree(export, broken)
    with open(os.path.join(broken, "params.npz"), "wb") as f:
        f.write(b"not a zip")
    out = refused(f"--config.reward_model.init_from={broken}")
    assert out.returncode != 0 and f"cannot read {broken}" in out.stderr

    # An SFT policy from another seed, or a directory without one, is refused by name.
    out = run_main(
        str(tmp_path / "other_seed"),
        f"--config.sft.init_from={wd}",
        "--config.seed=7",
        config="configs/ppo.py:smoke",
    )
    assert out.returncode != 0
    assert "seed: checkpoint has 0, config has 7" in out.stderr
    out = run_main(str(tmp_path / "none"), f"--config.sft.init_from={tmp_path}")
    assert out.returncode != 0 and "no finished SFT policy" in out.stderr


def test_value_models_reading_their_likelihood_train_resume_and_refuse_a_change(full_run, tmp_path):
    """model.value_inputs="hidden+likelihood": the reward model (first-slip targets, read by
    its lowest token score) and the critic started from it carry the LM head and a
    likelihood weight through a whole PPO run, from a shared SFT policy (an export, which
    holds no value-model setting); a checkpoint of it is refused under the other setting."""
    wd = str(tmp_path / "lik")
    flags = (
        f"--config.sft.init_from={full_run[0]}",
        "--config.model.value_inputs=hidden+likelihood",
        "--config.reward_model.loss_on=first_slip",
        "--config.reward_model.score=min",
    )
    out = run_main(wd, *flags, config="configs/ppo.py:smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    rs = rows(wd)
    rm = [r for r in rs if r["stage"] == "reward_model"]
    assert rm[-1]["rm/heldout_accuracy"] == rm[-1]["rm/heldout_min_accuracy"]
    assert [r["stage"] for r in rs].count("ppo") == 3
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["model"]["value_inputs"] == "hidden+likelihood"
    out = run_main(wd, *flags[:1], *flags[2:], config="configs/ppo.py:smoke")
    assert out.returncode != 0
    assert "model.value_inputs: checkpoint has 'hidden+likelihood', config has 'hidden'" in (
        out.stderr
    )
    out = run_main(str(tmp_path / "bad"), "--config.model.value_inputs=logprob")
    assert out.returncode != 0 and "model.value_inputs='logprob'" in out.stderr


def _checksum(stderr):
    line = [x for x in stderr.splitlines() if "policy parameter checksum" in x][-1]
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.multidevice(8)
def test_one_device_eight_devices_and_two_processes_agree(full_run, tmp_path):
    """The same command on 8 simulated devices (the fixture: batch over data), on 1 device,
    on a data x fsdp mesh, and as two JAX processes on one machine."""
    wd8, out8 = full_run
    ref = comparable(rows(wd8))

    def close(rs):
        assert [(r["stage"], r["step"]) for r in rs] == [(r["stage"], r["step"]) for r in ref]
        for a, b in zip(rs, ref, strict=True):
            for k in ("sft/loss", "rollout/response_length_mean", "critic/value_loss"):
                if k in b:
                    assert abs(a[k] - b[k]) <= 1e-3 * (1 + abs(b[k])), (a["stage"], k)

    env1 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    one = subprocess.run(
        main_cmd(str(tmp_path / "one")),
        cwd=ROOT,
        env=env1,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    close(comparable(rows(str(tmp_path / "one"))))

    fsdp = run_main(str(tmp_path / "fsdp"), "--config.mesh.data=4", "--config.mesh.fsdp=2")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    close(comparable(rows(str(tmp_path / "fsdp"))))

    wd2 = str(tmp_path / "two")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "VCPPO_COORDINATOR": "localhost:23571",
        "VCPPO_NUM_PROCESSES": "2",
    }
    procs = [
        subprocess.Popen(
            main_cmd(wd2, "--config.distributed=True"),
            cwd=ROOT,
            env={**env, "VCPPO_PROCESS_ID": str(i)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-3000:]
    sums = [_checksum(e) for e in errs]
    assert sums[0] == sums[1]  # The two processes hold the same policy.
    assert abs(sums[0] - _checksum(out8.stderr)) <= 1e-4 * abs(sums[0])
    close(comparable(rows(wd2)))


def test_math_prompt_set_from_a_pretrained_checkpoint(tmp_path):
    """data.task='math': a HF model directory (weights + tokenizer.json), prompts from JSONL
    through the TFDS builder, math-verify rewards; SFT and the synthetic reward model skipped;
    the prompt iterator's position is saved and restored."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.hf_fixtures import COMMON

    model_dir = tmp_path / "model"
    problems = [
        {"problem": f"Compute {a} times {b}.", "answer": str(a * b)}
        for a in range(2, 9)
        for b in range(3, 7)
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [p["problem"] + " \\boxed{" + p["answer"] + "}" for p in problems] * 3,
        trainers.BpeTrainer(
            vocab_size=100,
            special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    model = Qwen2ForCausalLM(Qwen2Config(**{**COMMON, "vocab_size": tok.get_vocab_size()}))
    model.save_pretrained(str(model_dir))
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    )
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in problems) + "\n")
    flags = [
        "--config.data.task=math",
        f"--config.model.hf_path={model_dir}",
        "--config.value_pretrain.init=policy",  # No reward-model data for math prompts.
        f"--config.data.train_files={data}",
        "--config.eval.num_prompts=4",
        "--config.rollout.max_new_tokens=8",
        "--config.data.prompt_template={prompt}",
    ]
    wd = str(tmp_path / "run")
    first = run_main(wd, *flags, "--config.stop_after_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    out = run_main(wd, *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    rs = rows(wd)
    assert [r["stage"] for r in rs if r["stage"] != "eval"] == ["value_pretrain"] * 3 + ["ppo"] * 3
    ppo = [r for r in rs if r["stage"] == "ppo"]
    assert "reward/verifier_timeouts" in ppo[0] and "rollout/accuracy" in ppo[0]
    ref = str(tmp_path / "ref")
    whole = run_main(ref, *flags)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert comparable(rows(wd)) == comparable(rows(ref))  # Iterator position restored.


@pytest.mark.slow
def test_grpo_and_every_ppo_option_run(tmp_path):
    """GRPO (no critic) with dynamic sampling, and PPO with every other optional term switched
    on, run end to end."""
    grpo = run_main(
        str(tmp_path / "grpo"),
        "--config.advantage.estimator=grpo",
        "--config.gae.whiten_advantages=False",
        "--config.rollout.dynamic_sampling=True",
        "--config.rollout.samples_per_prompt=2",
        "--config.rollout.prompts_per_step=4",
        "--config.critic.init=policy",
    )
    assert grpo.returncode == 0, grpo.stderr[-3000:]
    assert "critic/value_loss" not in rows(str(tmp_path / "grpo"))[-2]
    extras = run_main(
        str(tmp_path / "extras"),
        "--config.gae.length_adaptive_alpha=0.05",
        "--config.rollout.samples_per_prompt=2",
        "--config.rollout.prompts_per_step=4",
        "--config.ppo.kl_coef=0.01",
        "--config.ppo.value_clip=0.2",
        "--config.ppo.dual_clip=3.0",
        "--config.ppo.positive_nll_coef=0.1",
        "--config.ppo.eps_high=0.28",
        "--config.reward.overlong_buffer=8",
        "--config.reward.format_penalty=0.1",
        "--config.ppo.entropy_coef=0.001",
    )
    assert extras.returncode == 0, extras.stderr[-3000:]
    ppo = [r for r in rows(str(tmp_path / "extras")) if r["stage"] == "ppo"]
    assert all("actor/dual_clip_fraction" in r and "critic/value_loss" in r for r in ppo)
    assert all(r["ppo/skipped_minibatches"] == 0 for r in ppo)
    # Dynamic sampling (in the GRPO run): a step whose minibatches hold only dropped groups
    # (the untrained smoke policy gets most groups all wrong) takes no optimiser step.
    ppo = [r for r in rows(str(tmp_path / "grpo")) if r["stage"] == "ppo"]
    for r in ppo:
        assert ("actor/clip_fraction" in r) == (r["ppo/skipped_minibatches"] < 2)
        if r["rollout/kept_fraction"] == 0:
            assert r["ppo/skipped_minibatches"] == 2


def test_critic_init_offset_biases_the_starting_critic(full_run, tmp_path):
    """critic.init_offset shifts the critic's output when it is set up, whatever it starts
    from; value pretraining starts from the shifted critic; the linear profile grows the
    under-valuing with the distance from the end. Every PPO step logs the mechanism."""
    flags = ("--config.critic.init=policy", "--config.critic.init_offset=-2.0")
    wd = str(tmp_path / "constant")
    out = run_main(wd, *flags, config="configs/ppo.py:smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    ppo = [r for r in rows(wd) if r["stage"] == "ppo"]
    # A fresh value head outputs 0, so the first step's values are the offset itself.
    assert abs(ppo[0]["gae/value_first_token"] + 2.0) < 1e-5
    for key in (
        "mechanism/reward_long",
        "mechanism/advantage_first_tokens_q1",
        "mechanism/advantage_first_tokens_q4",
        "mechanism/critic_speed",
        "mechanism/actor_speed",
    ):
        assert key in ppo[0], key

    wd = str(tmp_path / "linear")
    out = run_main(
        wd, *flags, "--config.critic.init_offset_profile=linear", config="configs/ppo.py:smoke"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(wd, "position_profile.json")) as f:
        value = json.load(f)["value"]
    n = 32  # rollout.max_new_tokens of the smoke variant
    for t in (0, 1, 2):
        assert abs(value[t] - (-2.0 * (1 - t / n))) < 1e-5, (t, value[t])

    # VC-PPO: value pretraining starts from the shifted critic (the unshifted run is otherwise
    # the same run).
    wd = str(tmp_path / "vcppo")
    out = run_main(wd, "--config.critic.init_offset=-2.0", "--config.ppo.steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    vp = lambda rs: [r for r in rs if r["stage"] == "value_pretrain"][0]["critic/value_mean"]
    # Both start from the same reward model, on the same rollouts of the fixed policy.
    assert abs(vp(rows(wd)) - vp(rows(full_run[0])) + 2.0) < 0.05


def test_forced_routes_are_written_for_the_model_and_checked(tmp_path):
    """eval/accuracy_greedy_{direct,written}_route: the route's first tokens are written for
    the model, which continues from them, and the whole response is checked."""
    import numpy as np

    from configs import vcppo
    from vcppo_jax import runner
    from vcppo_jax.stages import evaluation

    c = vcppo.get_config("smoke")
    c.data.labels = True
    c.model.rope_theta = 1e5
    exp = runner.Experiment(c, str(tmp_path))
    assert exp.model_config.rope_theta == 1e5  # model.rope_theta reaches the model.
    # The model's table is rounded up past the tokenizer; the sampler never draws those ids.
    assert exp.model_config.vocab_size >= exp.tokenizer.vocab_size
    for sp in (exp.sampling_params, exp.greedy_params):
        assert sp.vocab_limit == exp.tokenizer.vocab_size
        # ... and the trainer's softmax leaves them out too (model.mask_unused_vocab).
        assert exp.model_config.vocab_limit == exp.tokenizer.vocab_size
    problems = exp.source.eval_problems(6)
    direct, written = evaluation.route_prefixes(exp.tokenizer, problems)
    tok = exp.tokenizer
    for p, d, w in zip(problems, direct, written, strict=True):
        assert tok.encode(p.direct_solution)[: len(d)] == d
        assert tok.encode(p.full_solution)[: len(w)] == w
        assert tok.decode(d).strip() == "Answer:" and tok.decode(w).strip() == "b"
    prompts, plen = tok.encode_prompts([p.prompt for p in problems])
    for forced in (direct, written):
        batch, _, _ = exp._rollout(
            exp.states.policy.params, problems, exp.key, exp.greedy_params, forced
        )
        tokens, positions = np.asarray(batch.tokens), np.asarray(batch.positions)
        for i, f in enumerate(forced):  # The prompt, then the forced tokens, then the response.
            n = int(plen[i])
            assert tokens[i, :n].tolist() == prompts[i, :n].tolist()
            assert tokens[i, n : n + len(f)].tolist() == f
            assert positions[i, 0] == n + len(f)
    # What is checked is the forced tokens and the continuation: right answers written after
    # the prefixes score as right.
    full, _ = exp.source.check(
        [
            tok.decode(w) + p.full_solution[len(" b") :]
            for p, w in zip(problems, written, strict=True)
        ],
        problems,
    )
    assert full.all()


def test_sft_only_run_reports_the_policys_accuracy_by_route(tmp_path):
    """ppo.steps=0 (how the study trains each seed's SFT policy): one evaluation of the SFT
    policy, with the accuracy of each route, after the SFT stage."""
    wd = str(tmp_path)
    flags = ("--config.ppo.steps=0",)
    out = run_main(wd, *flags, "--config.critic.init=policy", "--config.sft.steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    evals = [r for r in rows(wd) if r["stage"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 0
    for key in ("eval/accuracy", "eval/accuracy_sampled", "eval/accuracy_greedy_written_route"):
        assert 0.0 <= evals[0][key] <= 1.0
    assert [r["step"] for r in rows(wd) if r["stage"] == "sft"] == [0, 1]


def test_sigterm_during_the_final_evaluation_exits_143(tmp_path, monkeypatch):
    """The handler only sets a flag; a SIGTERM that arrives while the last evaluation runs must
    still end the run with 143 (the scheduler's 'stopped'), not 0."""
    from configs import vcppo
    from vcppo_jax import runner

    c = vcppo.get_config("smoke")
    c.ppo.steps = 1
    c.eval.every_steps = 5
    evaluate = runner.Experiment.evaluate

    def evaluate_then_sigterm(self, step):
        out = evaluate(self, step)
        if step == self.config.ppo.steps:  # The final evaluation.
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(runner.Experiment, "evaluate", evaluate_then_sigterm)
    with pytest.raises(SystemExit) as info:
        runner.run(c, str(tmp_path))
    assert info.value.code == 143
    assert [r["step"] for r in rows(str(tmp_path)) if r["stage"] == "eval"] == [0, 1]


@pytest.mark.parametrize(
    "damage",
    [
        "flip",
        pytest.param("truncate", marks=pytest.mark.slow),
        pytest.param("delete", marks=pytest.mark.slow),
    ],
)
def test_a_damaged_latest_checkpoint_falls_back_to_an_intact_one(full_run, tmp_path, damage):
    """Damaged bytes in the newest checkpoint are found by its digests, reported in one line
    naming the step and file, and the run resumes from the one before: same final metrics."""
    import shutil

    wd = str(tmp_path / "damaged")
    shutil.copytree(full_run[0], wd)
    ckpts = os.path.join(wd, "checkpoints")
    latest = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert os.path.exists(os.path.join(ckpts, "digests", f"{latest}.json"))
    data = os.path.join(ckpts, str(latest), "state", "d")
    target = os.path.join(data, sorted(os.listdir(data))[0])
    if damage == "flip":
        with open(target, "r+b") as f:
            f.seek(os.path.getsize(target) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x0F]))
    elif damage == "truncate":
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 3)
    else:
        os.remove(target)
    out = run_main(wd)
    assert out.returncode == 0, out.stderr[-3000:]
    rel = os.path.relpath(target, os.path.join(ckpts, str(latest)))
    assert f"checkpoint step {latest} in {ckpts} is damaged ({rel}" in out.stderr
    assert f"resumed from checkpoint {latest - 1}" in out.stderr
    assert comparable(rows(wd)) == comparable(rows(full_run[0]))
