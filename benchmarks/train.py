"""Training throughput, model FLOP utilisation and memory of the PPO actor and critic updates.

    python -m benchmarks.train [--model qwen2.5-0.5b] [--shapes 8x2048,2x8192,1x32768] \\
        [--attention auto] [--peer xla] [--dtype bfloat16] [--remat full] [--steps 3]

For each ``B x T`` shape, one actor update (``updates.actor_step``: the clipped surrogate over
every token) and one critic update (``updates.critic_step``) of a random-weight model of the
named shape, with the attention implementation asked for and, as the peer in the same run, the
``--peer`` implementation (``xla``: the scores materialised). Per update and implementation:

- ``compiled_temp_bytes``: XLA's compiled memory analysis (temporaries; arguments and outputs
  listed beside it), taken before running, so a shape that would not fit is still reported;
- ``seconds_per_step`` (median of ``--steps`` after one compiling step), ``tokens_per_s``;
- ``mfu``: model FLOPs per second over the device's peak (bf16 dense), FLOPs counted the
  standard way (PaLM, appendix B): ``6 N`` per token for the matmul parameters ``N`` (every
  projection and the LM or value head; the embedding look-up is not a matmul) plus
  ``12 L d_attn T`` for attention (``d_attn`` = heads x head size), remat's recomputation not
  counted; ``null`` where the device's peak is not known (CPUs);
- ``peak_bytes_in_use`` where the device reports it (GPUs, TPUs).

A shape whose peer fails (e.g. out of memory) records the error and goes on. On a CPU use small
shapes (``--model long``): the point there is the compiled memory growing linearly with T for
``blockwise`` and quadratically for ``xla``. Writes ``benchmarks/results/train_<backend>.json``
(or ``--out``) after each update measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import write_report
from vcppo_jax import models, train_state, updates
from vcppo_jax.models import ModelConfig
from vcppo_jax.models import attention as attention_lib

SHAPES = {
    "qwen2.5-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
        num_heads=12, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
    ),
    # The CPU experiments' model (configs/common.py, tiny / long) with a small vocabulary.
    "long": dict(
        vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4,
        num_kv_heads=2,
    ),
}  # fmt: skip

# Peak dense bf16 FLOP/s by device kind (vendor data sheets; SXM parts).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v4": 275e12,
}


def matmul_params(config: ModelConfig, head: str) -> int:
    """Parameters that multiply activations: every projection, and the LM head (the tied
    embedding counted once, as the head) or the value head."""
    e, f, d = config.hidden_size, config.intermediate_size, config.head_size
    h, kvh = config.num_heads, config.num_kv_heads
    per_layer = e * d * (h + 2 * kvh) + h * d * e + 3 * e * f
    head_params = e * config.vocab_size if head == "lm" else e
    return config.num_layers * per_layer + head_params


def flops_per_token(config: ModelConfig, seq_len: int, head: str) -> float:
    """Forward + backward model FLOPs per token: 6 N + 12 L d_attn T (PaLM's count)."""
    d_attn = config.num_heads * config.head_size
    return 6.0 * matmul_params(config, head) + 12.0 * config.num_layers * d_attn * seq_len


def _batch(config: ModelConfig, b: int, t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
    n = t - 1  # Response = every token after the first.
    positions = jnp.broadcast_to(jnp.arange(1, t, dtype=jnp.int32), (b, n))
    mask = jnp.ones((b, n), jnp.float32)
    return tokens, positions, mask


def _update(config: ModelConfig, head: str, b: int, t: int):
    """(jitted step, its arguments) of one actor or critic update at ``[b, t]``."""
    params = models.init_params(config, jax.random.key(0), head=head)
    state = train_state.TrainState.create(params, train_state.make_optimizer(1e-5))
    tokens, positions, mask = _batch(config, b, t)
    zeros = jnp.zeros(mask.shape, jnp.float32)
    if head == "lm":
        settings = updates.ActorSettings()
        positive = jnp.zeros((b,), bool)
        fn = lambda s: updates.actor_step(
            config, s, tokens, positions, mask, zeros, zeros + 1.0, zeros, positive, settings
        )
    else:
        fn = lambda s: updates.critic_step(config, s, tokens, positions, mask, zeros + 1.0, zeros)
    return fn, state


def measure(config: ModelConfig, head: str, b: int, t: int, steps: int) -> dict:
    """One update's compiled memory and, if it runs, its speed and MFU."""
    fn, state = _update(config, head, b, t)
    out: dict = {}
    try:
        compiled = jax.jit(fn, donate_argnums=0).lower(state).compile()
        mem = compiled.memory_analysis()
        if mem is not None:
            out["compiled_temp_bytes"] = int(mem.temp_size_in_bytes)
            out["compiled_argument_bytes"] = int(mem.argument_size_in_bytes)
            out["compiled_output_bytes"] = int(mem.output_size_in_bytes)
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            state, metrics = compiled(state)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    except Exception as e:  # E.g. out of memory: recorded, the other shapes still run.
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return out
    sec = statistics.median(times[1:]) if steps else times[0]
    device = jax.devices()[0]
    peak = PEAK_FLOPS.get(device.device_kind)
    flops = flops_per_token(config, t, head) * b * t
    out.update(
        seconds_per_step=sec,
        tokens_per_s=b * t / sec,
        model_tflops_per_s=flops / sec / 1e12,
        mfu=None if peak is None else flops / sec / peak,
    )
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        out["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    return out


def run(
    model: str, shapes, attention: str, peer: str, dtype: str, remat: str, steps: int, out=None
):
    """The report: per shape, update and implementation, ``measure``'s numbers, written to
    ``out`` (where given) after each, so a run cut short by a time limit keeps what it
    measured."""
    base = ModelConfig(**SHAPES[model], param_dtype=dtype, dtype=dtype, remat=remat)
    kinds = [attention_lib.resolve(attention, dtype=dtype)] + ([peer] if peer else [])
    report = {
        "model": model,
        "matmul_params_actor": matmul_params(base, "lm"),
        "dtype": dtype,
        "remat": remat,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "attention": kinds[0],
        "peer": peer,
        "results": {},
    }
    for b, t in shapes:
        for head, name in (("lm", "actor"), ("value", "critic")):
            for kind in dict.fromkeys(kinds):
                config = dataclasses.replace(base, attention=kind)
                r = measure(config, head, b, t, steps)
                report["results"][f"{b}x{t}/{name}/{kind}"] = r
                shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()}
                print(f"[train] {b}x{t} {name} {kind}: {shown}", flush=True)
                if out:
                    write_report(report, "train", out)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", choices=list(SHAPES))
    parser.add_argument("--shapes", default="8x2048,2x8192,1x32768")
    parser.add_argument("--attention", default="auto", choices=attention_lib.IMPLEMENTATIONS)
    parser.add_argument("--peer", default="xla", help="implementation to compare ('' = none)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"train_{jax.default_backend()}.json"
    )
    run(args.model, shapes, args.attention, args.peer, args.dtype, args.remat, args.steps, out)


if __name__ == "__main__":
    main()
