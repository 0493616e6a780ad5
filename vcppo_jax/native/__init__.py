"""Host-CPU kernels, compiled on first use and called from jitted code through XLA's FFI.

* ``gae_cpu.cc``: XLA:CPU runs the GAE recurrence (a reverse pass over time) several times
  slower than memory allows: a scan pays per-step loop overhead and the matrix form pays 2C
  flops per element. This is the plain reverse loop, one pass for both lambdas, rows split over
  threads.
* ``decode_cpu.cc``: the sampler's decode step. It multiplies a few rows (one token per
  sequence) by every weight matrix, so it is bound by streaming the weights: with the weights
  packed once per ``generate`` call into contiguous 48-column tiles (``pack_kernel``),
  ``packed_matmul`` streams them faster than XLA's own dot at batch 32
  (``benchmarks/sampling.py``). ``decode_attention`` attends over the slots of the KV cache
  each row can see, where XLA reads the whole cache and masks. Compiled for the host CPU
  (``-march=native``); the sampler's ``auto`` uses it only where the CPU has AVX-512.

Each is compiled with the system C++ compiler (``$CXX``, else ``g++``/``c++``) against the FFI
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
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

GAE_TARGET = "vcppo_gae_cpu"
MATMUL_TARGET = "vcppo_packed_matmul_cpu"
ATTENTION_TARGET = "vcppo_decode_attention_cpu"
TILE = 48  # Columns per packed tile: fixed by decode_cpu.cc (static_assert there).
_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_DIR, "gae_cpu.cc")
_DECODE_SOURCE = os.path.join(_DIR, "decode_cpu.cc")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    """The host CPU's feature flags (part of the cache key of ``-march=native`` builds)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(source: str, symbol: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    with open(source, "rb") as f:
        code = f.read()
    host = _cpu_flags() if "-march=native" in flags else ""
    fingerprint = code + (version + jaxlib.__version__ + " ".join(flags) + host).encode()
    key = hashlib.sha256(fingerprint).hexdigest()[:16]
    cache = os.environ.get("VCPPO_NATIVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vcppo_jax"
    )
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"{os.path.basename(source)[:-3]}-{key}.so")
    if not os.path.exists(lib):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", *flags]
        cmd += ["-I", jax.ffi.include_dir(), source, "-o", tmp, "-lpthread"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {source} failed:\n{out.stderr[-2000:]}")
        os.replace(tmp, lib)  # Atomic: concurrent builders each write their own file.
    dll = ctypes.CDLL(lib)
    getattr(dll, symbol)  # Fail here if the symbol is missing.
    return dll


def _native_disabled() -> bool:
    return os.environ.get("VCPPO_NATIVE", "1") == "0"


@functools.cache
def gae_cpu_available() -> bool:
    """Builds and registers the CPU GAE kernel once per process; False (with one warning) if
    it cannot be built, or when ``VCPPO_NATIVE=0``."""
    if _native_disabled():
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


@functools.cache
def _decode_dll() -> ctypes.CDLL | None:
    if _native_disabled():
        return None
    try:
        dll = _build(_DECODE_SOURCE, "VcppoDecodeAttention", ("-march=native",))
    except (RuntimeError, OSError) as e:
        warnings.warn(
            f"the native CPU decode kernels are unavailable ({e}); the sampler uses XLA's",
            stacklevel=3,
        )
        return None
    if dll.VcppoPackedMatmulTileWidth() != TILE:
        raise RuntimeError(f"decode_cpu.cc packs {dll.VcppoPackedMatmulTileWidth()} columns")
    jax.ffi.register_ffi_target(
        MATMUL_TARGET, jax.ffi.pycapsule(dll.VcppoPackedMatmul), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        ATTENTION_TARGET, jax.ffi.pycapsule(dll.VcppoDecodeAttention), platform="cpu"
    )
    return dll


def decode_cpu_available() -> bool:
    """The decode kernels (packed matmul, decode attention) were built and registered (False
    when ``VCPPO_NATIVE=0`` or no compiler: one warning)."""
    return _decode_dll() is not None


def decode_cpu_preferred() -> bool:
    """Whether ``auto`` should use the kernel: built, and the host has 512-bit vectors (on
    AVX2-only CPUs it is correct but no faster than XLA's dot)."""
    dll = _decode_dll()
    return dll is not None and dll.VcppoPackedMatmulVectorWidth() >= 16


def _require_decode() -> None:
    if not decode_cpu_available():
        raise ValueError("the native CPU decode kernels could not be built (see the warning)")


def on_several_devices(*trees) -> bool:
    """Whether any concrete array in ``trees`` is spread over more than one device: the host
    kernels would make XLA gather it onto every device, so callers keep XLA's own ops."""
    return any(
        isinstance(a, jax.Array)
        and not isinstance(a, jax.core.Tracer)
        and len(a.sharding.device_set) > 1
        for a in jax.tree.leaves(trees)
    )


def pack_kernel(w: jax.Array, *, transposed: bool = False) -> jax.Array:
    """``w [K, N]`` (or ``[N, K]`` with ``transposed``) -> ``[ceil(N / 48), K, 48]``, tiles of
    48 columns stored contiguously, the last one zero-padded. Plain JAX: runs inside jit."""
    w = w.T if transposed else w
    k, n = w.shape
    tiles = -(-n // TILE)
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, tiles * TILE - n)))
    return w.reshape(k, tiles, TILE).transpose(1, 0, 2)


def packed_matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """``x [..., K] @ w [K, n]`` with ``w`` packed by ``pack_kernel``: float32 on the host CPU."""
    _require_decode()
    k = x.shape[-1]
    if packed.ndim != 3 or packed.shape[1:] != (k, TILE) or packed.shape[0] != -(-n // TILE):
        raise ValueError(f"packed kernel {packed.shape} does not fit x [..., {k}] and n={n}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(jnp.float32)
    out = jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32)
    y = jax.ffi.ffi_call(MATMUL_TARGET, out, vmap_method="sequential")(
        x2, packed.astype(jnp.float32), n=np.int64(n)
    )
    return y.reshape(*lead, n)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, visible: jax.Array):
    """One query token per row over a KV cache, float32 on the host CPU.

    ``q [B, Hkv, G, D]`` (G query heads per KV head), caches ``[B, Hkv, S, D]``, ``visible [B]``:
    row b attends to slots ``0 .. visible[b] - 1`` (clipped to [1, S]) -> ``[B, Hkv, G, D]``:
    ``softmax(q k^T / sqrt(D)) v`` with the softmax in float32."""
    _require_decode()
    b, h, _, d = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (b, h) or k_cache.shape[3] != d:
        raise ValueError(
            f"q {q.shape} and caches {k_cache.shape}, {v_cache.shape} must be [B, Hkv, G, D] "
            "and [B, Hkv, S, D]"
        )
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    f32 = lambda a: a.astype(jnp.float32)
    return jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="sequential")(
        f32(q), f32(k_cache), f32(v_cache), visible.astype(jnp.int32)
    )
