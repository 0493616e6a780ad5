"""Host-CPU kernels, compiled on first use and called from jitted code through XLA's FFI.

XLA:CPU runs the GAE recurrence (a reverse pass over time) several times slower than memory
allows: a scan pays per-step loop overhead and the matrix form pays 2C flops per element.
``gae_cpu.cc`` is the plain reverse loop, one pass for both lambdas, rows split over threads.
It is compiled with the system C++ compiler (``$CXX``, else ``g++``/``c++``) against the FFI
headers shipped with jaxlib, cached under ``$VCPPO_NATIVE_CACHE`` (default
``~/.cache/vcppo_jax``) by a hash of the source, the compiler and the jaxlib version, and
registered as an FFI target. Where there is no compiler, or ``VCPPO_NATIVE=0``, callers fall
back to the pure-JAX solvers (one warning says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jaxlib

GAE_TARGET = "vcppo_gae_cpu"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gae_cpu.cc")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(source: str, symbol: str) -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    with open(source, "rb") as f:
        code = f.read()
    key = hashlib.sha256(code + version.encode() + jaxlib.__version__.encode()).hexdigest()[:16]
    cache = os.environ.get("VCPPO_NATIVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vcppo_jax"
    )
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"{os.path.basename(source)[:-3]}-{key}.so")
    if not os.path.exists(lib):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w"]
        cmd += ["-I", jax.ffi.include_dir(), source, "-o", tmp, "-lpthread"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {source} failed:\n{out.stderr[-2000:]}")
        os.replace(tmp, lib)  # Atomic: concurrent builders each write their own file.
    dll = ctypes.CDLL(lib)
    getattr(dll, symbol)  # Fail here if the symbol is missing.
    return dll


@functools.cache
def gae_cpu_available() -> bool:
    """Builds and registers the CPU GAE kernel once per process; False (with one warning) if
    it cannot be built, or when ``VCPPO_NATIVE=0``."""
    if os.environ.get("VCPPO_NATIVE", "1") == "0":
        return False
    try:
        dll = _build(_SOURCE, "VcppoGaeCpu")
    except (RuntimeError, OSError) as e:
        warnings.warn(
            f"the native CPU GAE kernel is unavailable ({e}); using the pure-JAX solver",
            stacklevel=2,
        )
        return False
    jax.ffi.register_ffi_target(GAE_TARGET, jax.ffi.pycapsule(dll.VcppoGaeCpu), platform="cpu")
    jax.ffi.register_ffi_target_as_batch_partitionable(GAE_TARGET)
    return True
