"""Causal grouped-query attention over positions, by three implementations.

Every function takes queries grouped by key head, ``q [B, Hkv, G, T, D]`` (G = query heads per
key head), keys and values ``[B, Hkv, S, D]``, and the positions of queries ``[B, T]`` and keys
``[B, S]`` (int). Query t sees key s when ``k_pos[s] <= q_pos[t]``: causal, and right padding
needs no mask of its own (padded slots lie after every real token of their row). Returns
``[B, Hkv, G, T, D]`` in the queries' dtype; products accumulate in float32.

- ``reference``: the scores ``[B, Hkv, G, T, S]`` materialised, then softmax. Memory O(T S).
- ``blockwise``: online softmax over key blocks of ``block`` keys (a ``lax.scan``), with a
  hand-written backward pass that recomputes each block's probabilities from the saved
  log-sum-exp instead of storing them (as flash attention does). Forward and backward then
  hold O((T + S) D + T x block) per head: linear in the length. Pure JAX: any backend.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
  kernel on NVIDIA GPUs; only for queries and keys at the same positions (training, the
  prompt pass), where the position mask is the causal one.
- ``cudnn_cached``: the same kernel over a KV cache in the cache's own layout ``[B, Hkv, S, D]``
  (no transpose of the cache), each row seeing its first ``kv_len`` slots: one query per row
  (a decode step) or the prompt pass from slot 0 (causal). Decoding through the XLA path takes
  five kernels per layer for this (scores, max, sum, normalise, values); this is one.
- ``splash``: the Pallas splash-attention kernel for TPUs (``jax.experimental.pallas.ops.tpu.
  splash_attention``, its multi-query form once per batch row and key head, causal over slots,
  flash-style forward and backward); like ``cudnn``, only where slot = position. Off a TPU it
  runs only in TPU interpret mode (``interpret=True``, or ``VCPPO_PALLAS_INTERPRET=1`` for the
  model's calls): a simulation for tests, correct and slow. Under ``jax.set_mesh`` it runs per
  shard (``shard_map``) in the default layout (``sharding.DEFAULT_RULES``): batch rows over
  the ``data`` and ``fsdp`` axes, key heads over ``tensor``, each where it divides them.

``IMPLEMENTATIONS`` names the choices of ``ModelConfig.attention``; ``resolve`` turns ``auto``
into the best available on the current backend for the model's dtype; ``check_available``
refuses, with the cure, a kernel that cannot run there.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
CUDNN_DTYPES = ("bfloat16", "float16")  # Activations cuDNN's fused attention takes.
CUDNN_MAX_HEAD_DIM = 256  # Hopper's limit for its flash kernel, forward and backward.
DEFAULT_BLOCK = 512
SPLASH_BLOCK = 128  # Query and key tile of the splash kernel (TPU lanes are 128 wide).
_FAR = jnp.iinfo(jnp.int32).max  # Position of padding keys: visible to no query.
# Run the Pallas TPU kernels in TPU interpret mode when the backend is not a TPU (tests).
INTERPRET_ENV = "VCPPO_PALLAS_INTERPRET"


class BackendError(ValueError):
    """An attention kernel asked for on a backend that lacks it (e.g. splash off a TPU)."""


def cudnn_max_head_dim() -> int:
    """The largest head dim cuDNN's flash kernel takes forward and backward here: 256 on Hopper
    and later, 128 on an older GPU in use (Ampere's backward pass stops there); 256 where no
    GPU is present (compiling for one)."""
    try:
        device = jax.devices()[0]
        capability = getattr(device, "compute_capability", None)
        if device.platform == "gpu" and capability and float(capability) < 9.0:
            return 128
    except (RuntimeError, ValueError):
        pass
    return CUDNN_MAX_HEAD_DIM


def cudnn_head_dim_ok(head_dim: int | None) -> bool:
    """Whether cuDNN's flash kernel takes heads of ``head_dim`` (None: unknown, assumed so):
    a multiple of 8 up to ``cudnn_max_head_dim()``."""
    return head_dim is None or (head_dim % 8 == 0 and head_dim <= cudnn_max_head_dim())


def resolve(
    name: str, backend: str | None = None, dtype: str | None = None, head_dim: int | None = None
) -> str:
    """The implementation ``name`` stands for on ``backend`` (default: JAX's) for activations
    of ``dtype`` (a name; None: any) and heads of ``head_dim`` (None: any): ``auto`` is
    ``cudnn`` on GPUs (``blockwise`` there for what cuDNN's kernel lacks: float32, or a head
    dim it does not take), ``splash`` on TPUs and ``blockwise`` elsewhere; other names stand
    for themselves."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r}; expected one of {IMPLEMENTATIONS}")
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    if backend == "gpu":
        fits = (dtype is None or dtype in CUDNN_DTYPES) and cudnn_head_dim_ok(head_dim)
        return "cudnn" if fits else "blockwise"
    return {"tpu": "splash"}.get(backend, "blockwise")


def check_available(
    name: str, dtype: str, backend: str | None = None, head_dim: int | None = None
) -> None:
    """Raises ``BackendError`` when the kernel ``name`` stands for cannot run here: cuDNN's
    off an NVIDIA GPU, for activations other than bfloat16 / float16 or for heads it does not
    take, splash off a TPU (unless TPU interpret mode is asked for, see
    ``splash_interpret``)."""
    backend = backend or jax.default_backend()
    kind = resolve(name, backend, dtype, head_dim)
    if kind == "cudnn" and backend != "gpu":
        raise BackendError(
            f"model.attention='cudnn' is cuDNN's kernel for NVIDIA GPUs and this backend is "
            f"{backend}: use auto, blockwise or xla"
        )
    if kind == "cudnn" and dtype not in CUDNN_DTYPES:
        raise BackendError(
            f"model.attention='cudnn' takes activations in {' or '.join(CUDNN_DTYPES)} and "
            f"model.dtype is {dtype}: set model.dtype=bfloat16, or use auto (blockwise for "
            f"{dtype} on a GPU), blockwise or xla"
        )
    if kind == "cudnn" and not cudnn_head_dim_ok(head_dim):
        raise BackendError(
            f"model.attention='cudnn': cuDNN's flash kernel takes head dims that are multiples "
            f"of 8 up to {cudnn_max_head_dim()} here, and the model's is {head_dim}: use auto "
            f"(blockwise for this model on a GPU), blockwise or xla"
        )
    if kind == "splash" and backend != "tpu":
        splash_interpret()


def _mask(q_pos, k_pos):
    return k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]  # [B, 1, 1, T, S]


def reference(q, k, v, q_pos, k_pos):
    """Attention with the scores materialised (the definition the others are tested against)."""
    p = jax.nn.softmax(_scores(q, k, q_pos, k_pos), axis=-1)
    p = jnp.where(jnp.isnan(p), 0.0, p)  # A query that sees no key: zeros, as blockwise.
    return jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v).astype(q.dtype)


def blockwise(q, k, v, q_pos, k_pos, block: int = DEFAULT_BLOCK):
    """Attention by key blocks with the memory-linear backward pass (see the module doc)."""
    s_len = k.shape[2]
    block = max(1, min(block, s_len))
    pad = -s_len % block
    if pad:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=_FAR)
    return _blockwise(q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32), block)


def _block(x, j, block):
    return jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=x.ndim - 2)


def _scores(q, k_j, q_pos, kp_j):
    """Masked scaled scores of (a block of) keys -> [B, Hkv, G, T, S] float32 (-inf masked)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k_j, preferred_element_type=jnp.float32) * scale
    return jnp.where(_mask(q_pos, kp_j), s, -jnp.inf)


def _forward(q, k, v, q_pos, k_pos, block):
    n_blocks = k.shape[2] // block
    stats = q.shape[:-1]  # [B, Hkv, G, T]

    def body(carry, j):
        m, denom, acc = carry
        kp_j = jax.lax.dynamic_slice_in_dim(k_pos, j * block, block, axis=1)
        s = _scores(q, _block(k, j, block), q_pos, kp_j)
        m_new = jnp.maximum(m, s.max(axis=-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # No key seen yet: nothing to scale.
        p = jnp.exp(s - shift[..., None])
        corr = jnp.exp(m - shift)
        denom = denom * corr + p.sum(axis=-1)
        pv = jnp.einsum(
            "bkgts,bksd->bkgtd",
            p.astype(v.dtype),
            _block(v, j, block),
            preferred_element_type=jnp.float32,
        )
        return (m_new, denom, acc * corr[..., None] + pv), None

    init = (
        jnp.full(stats, -jnp.inf, jnp.float32),
        jnp.zeros(stats, jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    (m, denom, acc), _ = jax.lax.scan(body, init, jnp.arange(n_blocks))
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    out = jnp.where(seen[..., None], acc / safe[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(safe), jnp.inf)  # exp(s - inf) = 0.
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q, k, v, q_pos, k_pos, block):
    return _forward(q, k, v, q_pos, k_pos, block)[0]


def _blockwise_fwd(q, k, v, q_pos, k_pos, block):
    out, lse = _forward(q, k, v, q_pos, k_pos, block)
    return out, (q, k, v, q_pos, k_pos, out, lse)


def _blockwise_bwd(block, res, d_out):
    q, k, v, q_pos, k_pos, out, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [B, Hkv, G, T]
    n_blocks = k.shape[2] // block

    def body(dq, j):
        k_j, v_j = _block(k, j, block), _block(v, j, block)
        kp_j = jax.lax.dynamic_slice_in_dim(k_pos, j * block, block, axis=1)
        p = jnp.exp(_scores(q, k_j, q_pos, kp_j) - lse[..., None])  # Recomputed, not stored.
        dv_j = jnp.einsum("bkgts,bkgtd->bksd", p, d_out)
        dp = jnp.einsum("bkgtd,bksd->bkgts", d_out, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgts,bksd->bkgtd", ds, k_j, preferred_element_type=jnp.float32)
        dk_j = jnp.einsum("bkgts,bkgtd->bksd", ds, q, preferred_element_type=jnp.float32)
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(n_blocks))
    # [n_blocks, B, Hkv, block, D] -> [B, Hkv, n_blocks * block, D]
    unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(k.shape)
    return (
        dq.astype(q.dtype),
        unblock(dk).astype(k.dtype),
        unblock(dv).astype(v.dtype),
        None,
        None,
    )


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _row_and_head_spec(mesh, rows: int, heads: int):
    """The PartitionSpec of a ``[rows, heads, ...]`` operand in the default layout
    (``sharding.DEFAULT_RULES``): rows over the ``data`` and ``fsdp`` axes, heads over
    ``tensor``, each named mesh axis only while it divides the dimension."""
    from jax.sharding import PartitionSpec as P

    from vcppo_jax import sharding

    def split(dim, name):  # The rule's mesh axes, in order, while they divide ``dim``.
        return sharding.dividing_axes(dim, sharding.rule_axes(name), mesh.shape) or None

    return P(split(rows, "batch"), split(heads, "kv_heads"))


def _alike(*xs, heads_axis: int, lengths=()):
    """Under a mesh of several devices (``jax.set_mesh``), ``xs`` constrained to one layout
    (rows, and heads on ``heads_axis`` where the fewest heads divide, as
    ``_row_and_head_spec``), and the per-row ``lengths`` split as the rows: cuDNN's
    partitioner takes query, key and value only when they are sharded alike, and hands each
    shard the lengths as they arrive. Returns ``xs + lengths``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return (*xs, *lengths)
    spec = _row_and_head_spec(mesh, xs[0].shape[0], min(x.shape[heads_axis] for x in xs))
    rows = jax.sharding.PartitionSpec(spec[0])
    spec = jax.sharding.PartitionSpec(*(spec[0], *([None] * (heads_axis - 1)), spec[1]))
    return (
        *(jax.lax.with_sharding_constraint(x, spec) for x in xs),
        *(jax.lax.with_sharding_constraint(n, rows) for n in lengths),
    )


def cudnn(q, k, v):
    """cuDNN's fused causal attention (queries and keys at the same positions, slot = position)."""
    b, kvh, g, t, d = q.shape
    qh = jnp.moveaxis(q.reshape(b, kvh * g, t, d), 2, 1)  # [B, T, H, D]
    kh, vh = jnp.moveaxis(k, 2, 1), jnp.moveaxis(v, 2, 1)  # [B, S, Hkv, D]
    qh, kh, vh = _alike(qh, kh, vh, heads_axis=2)
    out = jax.nn.dot_product_attention(qh, kh, vh, is_causal=True, implementation="cudnn")
    return jnp.moveaxis(out, 1, 2).reshape(b, kvh, g, t, d)


# What ``cudnn_cached`` hands JAX's own cuDNN wrapper (a private module: its BNTH layout and
# per-row lengths are what the public ``jax.nn.dot_product_attention`` lacks).
_PRIVATE_PARAMS = ("q_seqlen", "kv_seqlen", "scale", "mask_type", "qkv_layout")


@functools.cache
def private_cudnn_api():
    """JAX's private cuDNN attention module when it takes what ``cudnn_cached`` passes (BNTH
    layout, per-row lengths, padding masks); None when this JAX version moved or changed it,
    and then ``cudnn_cached`` goes through the public ``jax.nn.dot_product_attention`` with the
    cache transposed, after one warning. Checked once per process."""
    import inspect
    import warnings

    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa

        params = inspect.signature(fa.dot_product_attention).parameters
        missing = [n for n in _PRIVATE_PARAMS if n not in params]
        missing += [m for m in ("PADDING", "PADDING_CAUSAL") if not hasattr(fa.MaskType, m)]
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        fa, missing = None, [f"{type(e).__name__}: {e}"]
    if not missing:
        return fa
    warnings.warn(
        f"jax {jax.__version__}: its private cuDNN attention wrapper lacks {missing}; decoding "
        f"uses the public jax.nn.dot_product_attention, which transposes the KV cache at each "
        f"step (correct, slower)",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def cudnn_cached(q, k_cache, v_cache, kv_len, causal: bool, implementation: str = "cudnn"):
    """cuDNN's fused attention of ``q [B, Hkv, G, T, D]`` over the caches ``[B, Hkv, S, D]``,
    where row b sees its first ``kv_len[b]`` slots (the slots after them are masked, whatever
    they hold). ``causal=False``: one query per row, at slot ``kv_len - 1`` (a decode step);
    ``causal=True``: the queries sit at slots 0..T-1 (the prompt pass, which always starts at
    slot 0), query t sees slots <= t.
    Query head ``k * G + g`` reads key head ``k``, as in the model.
    Through JAX's private wrapper in the cache's layout where it fits (``private_cudnn_api``),
    else through the public API with ``implementation`` (``cudnn``; ``xla`` tests it on a
    CPU)."""
    b, kvh, g, t, d = q.shape
    if not causal and t != 1:
        raise ValueError(f"without causal masking one query per row is expected; got T={t}")
    kv_len = kv_len.astype(jnp.int32)
    q_len = jnp.full((b,), t, jnp.int32)
    k_cache, v_cache = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    fa = private_cudnn_api() if implementation == "cudnn" else None
    if fa is None:
        return _public_cached(q, k_cache, v_cache, q_len, kv_len, causal, implementation)
    mask = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    qh, kh, vh, q_len, kv_len = _alike(
        q.reshape(b, kvh * g, t, d), k_cache, v_cache, heads_axis=1, lengths=(q_len, kv_len)
    )
    out = fa.dot_product_attention(
        qh,
        kh,
        vh,
        q_seqlen=q_len,
        kv_seqlen=kv_len,
        scale=1.0 / math.sqrt(d),
        mask_type=mask,
        qkv_layout="BNTH",
    )
    return out.reshape(b, kvh, g, t, d)


def _public_cached(q, k_cache, v_cache, q_len, kv_len, causal, implementation):
    """``cudnn_cached`` through ``jax.nn.dot_product_attention`` (``[B, T, N, D]`` layouts: the
    cache is transposed; causal from the top left, as the prompt pass from slot 0 wants)."""
    b, kvh, g, t, d = q.shape
    qh = jnp.moveaxis(q.reshape(b, kvh * g, t, d), 1, 2)
    kh, vh = jnp.moveaxis(k_cache, 1, 2), jnp.moveaxis(v_cache, 1, 2)
    qh, kh, vh, q_len, kv_len = _alike(qh, kh, vh, heads_axis=2, lengths=(q_len, kv_len))
    out = jax.nn.dot_product_attention(
        qh,
        kh,
        vh,
        is_causal=causal,
        query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len,
        implementation=implementation,
    )
    return jnp.moveaxis(out, 2, 1).reshape(b, kvh, g, t, d)


def splash_interpret() -> bool:
    """Whether the model's splash calls run in TPU interpret mode: on a TPU never; elsewhere
    only when ``VCPPO_PALLAS_INTERPRET=1`` (otherwise a clear error: the kernel is TPU-only)."""
    if jax.default_backend() == "tpu":
        return False
    if os.environ.get(INTERPRET_ENV) == "1":
        return True
    raise BackendError(
        f"model.attention='splash' is the Pallas TPU kernel and this backend is "
        f"{jax.default_backend()}: use auto, blockwise or cudnn (or set {INTERPRET_ENV}=1 to "
        f"simulate the TPU kernel, slowly, in tests)"
    )


def splash(q, k, v, *, block: int = SPLASH_BLOCK, interpret: bool = False):
    """The Pallas splash-attention kernel, causal over slots (queries and keys at the same
    positions), on ``q [B, Hkv, G, T, D]``, ``k``, ``v [B, Hkv, T, D]``. The length is padded
    up to a multiple of ``block`` at the end, where a causal mask hides it from every real
    query. Under ``jax.set_mesh`` the kernel runs once per shard (see the module doc)."""
    if block <= 0 or block % 128:
        raise ValueError(f"block={block}: the splash kernel's tile must be a multiple of 128")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _splash_local(q, k, v, block, interpret)
    spec = _row_and_head_spec(mesh, q.shape[0], q.shape[1])
    local = functools.partial(_splash_local, block=block, interpret=interpret)
    # A mesh axis that splits neither leaves the kernel's work repeated on its devices.
    return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        q, k, v
    )


def _splash_local(q, k, v, block, interpret):
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, kvh, g, t, d = q.shape
    pad = -t % block
    if pad:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k, v))
    n = t + pad
    # One square tile everywhere: forward, and both backward kernels (dq, dk / dv).
    blocks = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sa.MultiHeadMask([sa.CausalMask((n, n))] * g)
    kernel = sa.make_splash_mqa(
        mask,
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        # TPU interpret mode for the forward and backward kernels alike.
        interpret=pltpu.InterpretParams() if interpret else False,
    )
    scaled = (q * (1.0 / math.sqrt(d))).astype(q.dtype)  # The kernel does not scale.
    flat = lambda x: x.reshape((b * kvh,) + x.shape[2:])

    # One kernel per (row, key head) over its G query heads (multi-query form); a loop rather
    # than vmap, whose batched grid TPU interpret mode cannot run.
    out = jax.lax.map(lambda a: kernel(*a), (flat(scaled), flat(k), flat(v)))
    return out.reshape(b, kvh, g, n, d)[:, :, :, :t].astype(q.dtype)
