"""The workdir lock and the config record kept on resume."""

import json
import os

import pytest

from vcppo_jax import workdir


def test_lock_is_exclusive_and_a_stale_one_is_taken_over(tmp_path, capsys):
    wd = str(tmp_path)
    with open(os.path.join(wd, ".lock"), "w") as f:
        f.write("host elsewhere pid 999999")  # Left by a run that died (no flock held).
    lock = workdir.WorkdirLock(wd).acquire()
    assert "taking over" in capsys.readouterr().err
    with open(os.path.join(wd, ".lock")) as f:
        assert f.read() == f"host {os.uname().nodename} pid {os.getpid()}"
    with pytest.raises(workdir.WorkdirLockedError, match=f"pid {os.getpid()}"):
        workdir.WorkdirLock(wd).acquire()  # Another open file: flock says no.
    lock.release()
    with workdir.WorkdirLock(wd):  # Released: free again, and no stale-lock message.
        assert "taking over" not in capsys.readouterr().err


def test_record_config_lists_changes_only_on_resume(tmp_path, capsys):
    wd = str(tmp_path)
    a = json.dumps({"gae": {"lambda_actor": 0.95}, "seed": 0})
    b = json.dumps({"gae": {"lambda_actor": 0.5}, "seed": 0, "new": {"x": 1}})
    assert workdir.record_config(wd, a, None) == {}
    assert workdir.record_config(wd, b, None) == {}  # A fresh start records nothing.
    assert not os.path.exists(os.path.join(wd, "resumes.jsonl"))
    workdir.record_config(wd, a, None)
    changes = workdir.record_config(wd, b, "ppo step 10")
    assert changes == {"gae.lambda_actor": [0.95, 0.5], "new.x": [None, 1]}
    assert "gae.lambda_actor: 0.95 -> 0.5" in capsys.readouterr().err
    with open(os.path.join(wd, "resumes.jsonl")) as f:
        (rec,) = [json.loads(line) for line in f]
    assert rec["resumed_at"] == "ppo step 10" and rec["changed"] == changes
    with open(os.path.join(wd, "config.json")) as f:
        assert f.read() == b


def test_unusable_workdirs_are_refused_naming_the_path(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(workdir.WorkdirError, match="exists and is not a directory"):
        workdir.prepare(str(afile))
    with pytest.raises(workdir.WorkdirError, match=r"cannot create .*afile.* \(Not a directory\)"):
        workdir.prepare(str(afile / "sub"))
    if os.geteuid() != 0:  # Permissions do not bind root.
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(workdir.WorkdirError, match=r"ro: not writable \(Permission denied\)"):
            workdir.prepare(str(ro))
    workdir.prepare(str(tmp_path / "new" / "deeper"))
    assert os.listdir(tmp_path / "new" / "deeper") == []  # The write probe is removed.


def test_host_record_names_the_numerical_environment():
    import hashlib

    import jax

    host = workdir.host_record()
    assert host == workdir.host_record()  # Stable within a process.
    assert host["jax"] == jax.__version__ and host["backend"] == jax.default_backend()
    rest = {k: v for k, v in host.items() if k != "id"}
    digest = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:12]
    assert host["id"] == digest  # Any field that differs gives another id.
    assert host["cpu"] and len(host["cpu_flags"]) == 12


def test_host_record_names_xla_flags_and_product_precision_only_where_set(monkeypatch):
    import jax

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    precision = jax.config.jax_default_matmul_precision  # "highest" where the suite is on a GPU.
    jax.config.update("jax_default_matmul_precision", None)
    try:
        plain = workdir.host_record()
        assert "xla_flags" not in plain and "matmul_precision" not in plain
        monkeypatch.setenv("XLA_FLAGS", " --xla_gpu_deterministic_ops=true ")
        flagged = workdir.host_record()
        assert flagged["xla_flags"] == "--xla_gpu_deterministic_ops=true"
        assert flagged["id"] != plain["id"]
        monkeypatch.delenv("XLA_FLAGS")
        with jax.default_matmul_precision("highest"):
            precise = workdir.host_record()
        assert precise["matmul_precision"] == "highest" and precise["id"] != plain["id"]
        assert workdir.host_record() == plain
    finally:
        jax.config.update("jax_default_matmul_precision", precision)
