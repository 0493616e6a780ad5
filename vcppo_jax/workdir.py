"""Workdir safety: one run per workdir (an exclusive lock), and config.json kept true on resume.

``WorkdirLock`` holds an exclusive ``flock`` on ``WORKDIR/.lock`` for the life of a run and
writes the holder's host and PID into it; a second run on the same workdir fails at once naming
the holder. The kernel drops the lock when its process dies (kill -9 included), so a lock file
left by a dead run is taken over, with a message naming it.

``record_config`` writes ``config.json`` once the checkpoint's fingerprint has been accepted
and, on a resume, lists the fields that differ from the previous run's config (those outside
the fingerprint: the fingerprinted ones were refused before) on stderr and appends them to
``resumes.jsonl``, so a workdir's record says what every part of it ran under.

``host_record`` says what numerical environment a run ran on (the runner records it in
``config.json`` under ``resolved.host``): runs repeat bit for bit on one such environment, but
XLA's CPU kernels differ by processor and version, and the last digits of two hosts' runs
differ, which over tens of PPO steps can part their trajectories. A resume on another host
shows in ``resumes.jsonl`` as a change of ``resolved.host``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import socket
import sys
import time
from typing import Any

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
RESUMES_FILE = "resumes.jsonl"


class WorkdirError(RuntimeError):
    """A workdir that cannot be used: not a directory, not writable, or held by another run."""


class WorkdirLockedError(WorkdirError):
    """Another live run holds the workdir."""


def prepare(workdir: str) -> None:
    """Creates ``workdir`` if needed and checks that files can be written in it; raises
    ``WorkdirError`` naming the path and the reason otherwise."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir}: exists and is not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        where = e.filename or workdir
        raise WorkdirError(f"--workdir {workdir}: cannot create {where} ({e.strerror})") from e
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir}: not writable ({e.strerror})") from e


class WorkdirLock:
    """An exclusive lock on a workdir (``with WorkdirLock(workdir): ...``)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Takes the lock or raises ``WorkdirLockedError`` naming the run that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "another process"
            os.close(fd)
            raise WorkdirLockedError(
                f"{os.path.dirname(self.path)} is in use by {holder} (lock file {self.path}); "
                "wait for that run to end or use another --workdir"
            ) from None
        previous = _read(fd)
        me = f"host {socket.gethostname()} pid {os.getpid()}"
        if previous:
            print(
                f"workdir lock: taking over {self.path}, left by {previous}, which no longer "
                "holds it",
                file=sys.stderr,
                flush=True,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file and drops the lock."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """Field -> [old, new] for every field whose value differs (or that only one side has)."""
    a, b = _flat(old), _flat(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def record_config(workdir: str, config_json: str, resumed_at: str | None) -> dict[str, list]:
    """Writes ``config.json`` (whole, through a temporary file). ``resumed_at`` (e.g. "ppo step
    10") when resuming from a checkpoint: the fields changed since the previous config.json are
    printed and appended to ``resumes.jsonl``. Returns those changes."""
    path = os.path.join(workdir, CONFIG_FILE)
    changes: dict[str, list] = {}
    if resumed_at is not None and os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            old = {}
            print(f"warning: {path} unreadable ({e}); not compared", file=sys.stderr)
        changes = config_changes(old, json.loads(config_json)) if old else {}
        if changes:
            lines = "\n  ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items())
            print(
                f"resuming at {resumed_at} with {len(changes)} changed field(s) (recorded in "
                f"{RESUMES_FILE}):\n  {lines}",
                file=sys.stderr,
                flush=True,
            )
            record = {"time": time.time(), "resumed_at": resumed_at, "changed": changes}
            with open(os.path.join(workdir, RESUMES_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config_json)
    os.replace(tmp, path)
    return changes


def _cpu() -> tuple[str, str]:
    """The processor's model name and a digest of its feature flags (what XLA's CPU code is
    compiled for), from /proc/cpuinfo where there is one."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags") or fields.get("Features") or ""
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    return fields.get("model name") or platform.processor() or platform.machine(), digest


def host_record() -> dict[str, Any]:
    """The numerical environment of this process: library versions, backend, devices, on a
    CPU the processor, XLA's flags and the float32 product precision where set, with ``id``, a
    short digest of all of it (equal ids: runs of one config repeat bit for bit; different
    ids: they may differ in the last digits)."""
    import jax
    import jaxlib

    device = jax.devices()[0]
    cpu, flags = _cpu()
    record = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_flags": flags,
    }
    # Settings that change the numbers, recorded (and digested) only where they are set, so
    # the ids of runs without them stay as they were: XLA's flags, float32 products' precision
    # (on a GPU JAX's default is TF32), and on a GPU the cuDNN library's version.
    if os.environ.get("XLA_FLAGS", "").strip():
        record["xla_flags"] = os.environ["XLA_FLAGS"].strip()
    if jax.config.jax_default_matmul_precision:
        record["matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    if record["backend"] == "gpu":
        try:
            from jax._src.lib import cuda_versions

            record["cudnn"] = cuda_versions.cudnn_get_version()
        except Exception:  # noqa: BLE001 - a missing or moved module: the record says so.
            record["cudnn"] = "unknown"
    record["id"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    return record
