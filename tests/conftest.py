"""Test set-up: simulated CPU devices (8 unless ``VCPPO_TEST_CPU_DEVICES`` says otherwise), the
``slow`` marker, and ``multidevice(n)``: a test that needs ``n`` devices is skipped, with the
reason, where the backend has fewer (one GPU, or a CPU run with fewer simulated devices)."""

import os

CPU_DEVICES = int(os.environ.get("VCPPO_TEST_CPU_DEVICES", "8"))

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={CPU_DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
