"""Test set-up: simulated CPU devices (8 unless ``VCPPO_TEST_CPU_DEVICES`` says otherwise); on a
GPU, full-precision float32 products and deterministic reductions; the ``slow`` marker; and
``multidevice(n)``: a test that needs ``n`` devices is skipped, with the reason, where the
backend has fewer (one GPU, or a CPU run with fewer simulated devices); a compilation cache
shared by the suite's processes."""

import os

CPU_DEVICES = int(os.environ.get("VCPPO_TEST_CPU_DEVICES", "8"))

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={CPU_DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On a GPU (JAX_PLATFORMS=cuda), as environment variables so the runs the tests start as
# subprocesses inherit them: float32 products in full precision (JAX's default there is
# TF32, a 10-bit mantissa, which the references' tolerances are not written for);
# deterministic reductions (no atomic scatter-adds), which the bit-for-bit resume tests need;
# and no preallocation of 75% of the card by each of the suite's processes.
if any(p in os.environ["JAX_PLATFORMS"] for p in ("cuda", "gpu")):
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ["XLA_FLAGS"] += " --xla_gpu_deterministic_ops=true"

# One persistent compilation cache for the suite's processes (the xdist workers and every run
# the runner tests start as a subprocess): the same smoke-sized programs are compiled once,
# not once per run, which is most of a smoke run's time. A cached program is the same program
# (a run's metrics are bit for bit those of a run that compiled afresh). Entries are keyed by
# the program, the compile options and the JAX version, so a stale one is never read. The
# size cap turns on JAX's file lock, so concurrent writers do not tear entries.
# VCPPO_TEST_COMPILATION_CACHE=0 compiles everything afresh; =DIR puts the cache there.
_cache = os.environ.get("VCPPO_TEST_COMPILATION_CACHE", "1")
if _cache != "0":
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR",
        os.path.join(_root, ".pytest_cache", "jax_compilation") if _cache == "1" else _cache,
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "multidevice(n): needs n devices (skipped where fewer)")


def pytest_collection_modifyitems(config, items):
    import jax

    present = None
    for item in items:
        marker = item.get_closest_marker("multidevice")
        if marker is None:
            continue
        if present is None:
            present = jax.device_count()
        need = marker.args[0] if marker.args else 8
        if present < need:
            reason = (
                f"needs {need} devices; the {jax.default_backend()} backend has {present} (on "
                f"CPU the suite simulates {need} unless VCPPO_TEST_CPU_DEVICES says otherwise)"
            )
            item.add_marker(pytest.mark.skip(reason=reason))
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
