"""Sampling throughput beside transformers' ``generate``, and log-prob memory, in one run.

    python -m benchmarks.sampling [--model bench100m] [--dtype float32] [--batch 32] \
        [--prompt 64] [--new 256] [--peers dynamic,static] [--skip_torch]
    python -m benchmarks.sampling --model qwen2.5-0.5b --dtype bfloat16 --batch 64 \
        --prompt 128 --new 512          # on a GPU

1. Generated tokens per second for a model of the named shape with random weights
   (``bench100m``: ~100M parameters, hidden 768, 12 layers, 12 heads / 2 KV heads, MLP 2048,
   vocabulary 32768, tied embeddings; or the Qwen2.5 shapes of ``benchmarks/train.py``),
   greedy, every row generating exactly ``--new`` tokens (no EOS). The samplers alternate over
   ``--repeats`` rounds; the speed-up is the median of the per-round ratios.
   Peers: transformers ``generate`` (``do_sample=False``, on the GPU when JAX runs on one) on
   the same weights, exported with ``hf.save_checkpoint`` and loaded with ``from_pretrained``,
   with its default dynamic KV cache and with ``cache_implementation="static"``. The first
   tokens are compared, so the runs do the same work.
   The memory floor of a decode step: every weight the step multiplies by read once (the
   tied embedding once, as the LM head) plus the KV cache at the mean length
   (``decode_bytes_per_step``); with the device's memory bandwidth known (``BANDWIDTH``) the
   report gives the floor's tokens/s and the share of it reached (a step also runs the
   prompt pass once per call, so the share is a lower bound).
2. Peak memory of the log-prob head (hidden states -> log p of given tokens) at ``[8, 4096]``
   with a 151,936-token vocabulary (Qwen2.5) and hidden size 896: chunked (as
   ``token_logprobs`` does, default chunk size) against materialising the whole logits
   tensor, from XLA's compiled memory analysis (compiled, not run: unchunked needs ~20 GB).

Writes ``benchmarks/results/sampling_<backend>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import write_report
from benchmarks.train import SHAPES, matmul_params
from vcppo_jax import models, sampling
from vcppo_jax.models import ModelConfig, hf
from vcppo_jax.models import attention as attention_lib

MODELS = {
    "bench100m": dict(
        vocab_size=32768, hidden_size=768, intermediate_size=2048, num_layers=12,
        num_heads=12, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": SHAPES["qwen2.5-0.5b"],
    "qwen2.5-1.5b": SHAPES["qwen2.5-1.5b"],
}  # fmt: skip

# Peak memory bandwidth in bytes/s by device kind (vendor data sheets; SXM parts).
BANDWIDTH = {
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA A100-SXM4-80GB": 2.04e12,
    "TPU v5 lite": 0.82e12,
    "TPU v5p": 2.76e12,
    "TPU v4": 1.2e12,
}


def bench_config(model: str, dtype: str, attention: str = "xla") -> ModelConfig:
    return ModelConfig(
        **MODELS[model],
        model_type="qwen2",
        rope_theta=1e6,
        max_position_embeddings=32768,
        dtype=dtype,
        param_dtype=dtype,
        attention=attention,
    )


def decode_bytes_per_step(config: ModelConfig, batch: int, context: float) -> float:
    """Bytes a decode step must read at least: the weights it multiplies by (``matmul_params``,
    the tied embedding counted once as the LM head) and the K and V caches of ``batch`` rows
    holding ``context`` tokens each, in the model's dtype."""
    item = np.dtype(jnp.dtype(config.dtype)).itemsize
    kv = 2 * config.num_layers * batch * config.num_kv_heads * context * config.head_size
    return float(item * (matmul_params(config, "lm") + kv))


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def jax_runner(config, params, prompts, lengths, new_tokens):
    """-> run() timing one ``generate`` call (compiled first) -> (seconds, tokens)."""
    sp = sampling.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)

    def run(seed=0):
        t0 = time.perf_counter()
        out = sampling.generate(config, params, prompts, lengths, sp, jax.random.key(seed))
        tokens = np.asarray(out.response_tokens)
        return time.perf_counter() - t0, tokens

    run()  # Compile.
    return run


def torch_runner(path, prompts, new_tokens, dtype: str, cache: str):
    """transformers ``generate`` with the ``dynamic`` (default) or ``static`` KV cache, on the
    GPU when JAX runs on one and torch sees it."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    kw = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    if cache == "static":
        kw["cache_implementation"] = "static"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # Warm-up.

    def run(seed=0):
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            sync()
            return time.perf_counter() - t0, out[:, ids.shape[1] :].cpu().numpy()

    return run


def logprob_memory(batch=8, length=4096, vocab=151936, hidden=896):
    """Peak memory of the log-prob head (final hidden states -> log p of the given tokens),
    the part that chunking changes; the backbone's own activations are the same either way."""
    from vcppo_jax.models import chunked_logprobs

    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=128,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )
    params = jax.eval_shape(lambda k: models.init_params(config, k), jax.random.key(0))
    h = jax.ShapeDtypeStruct((batch, length, hidden), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    model = models.Transformer(config)
    chunk = models.auto_chunk_size(batch, vocab)

    def unchunked(p, h, t):
        logits = model.apply({"params": p}, h, method=models.Transformer.logits)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]

    def chunked(p, h, t):  # As ``models.token_logprobs`` forms them from the hidden states.
        kernel = model.apply({"params": p}, method=models.Transformer.lm_kernel)
        return chunked_logprobs(h, t, kernel, 1.0, chunk)[0]

    out = {"chunk_size": chunk}
    for name, fn in (("unchunked", unchunked), ("chunked", chunked)):
        for mode in ("forward", "forward+backward"):
            if mode == "forward":
                f = fn
            else:
                f = jax.grad(lambda p, h, t, fn=fn: jnp.sum(fn(p, h, t)), argnums=(0, 1))
            mem = jax.jit(f).lower(params, h, tokens).compile().memory_analysis()
            out[f"{name} {mode}"] = int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench100m", choices=list(MODELS))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "xla", "cudnn"),
        help="prompt pass and decode attention (auto: cudnn on a GPU in bf16, else xla)",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (samplers alternate)")
    parser.add_argument(
        "--peers", default="dynamic,static", help="transformers KV caches to run (comma list)"
    )
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument(
        "--profile", default=None, help="folder for a jax.profiler trace of the last round"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    # Decode steps attend through cuDNN or through XLA's products (blockwise and splash
    # change only the prompt pass): auto is cuDNN where it can run (a GPU, bf16 or fp16).
    if args.attention == "auto":
        attention = "cudnn" if attention_lib.resolve("auto", dtype=args.dtype) == "cudnn" else "xla"
    else:
        attention = args.attention
        attention_lib.check_available(attention, args.dtype)
    config = bench_config(args.model, args.dtype, attention)
    # Initialised (and exported for the peers) in float32, then cast: the same weights in both.
    config32 = config.replace(dtype="float32", param_dtype="float32")
    params32 = models.init_params(config32, jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(args.dtype)), params32)
    n_params = count_params(params)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, size=(args.batch, args.prompt)).astype(np.int32)
    lengths = np.full((args.batch,), args.prompt, np.int32)
    generated = args.batch * args.new
    device_kind = jax.devices()[0].device_kind
    report = {
        "backend": jax.default_backend(),
        "device": device_kind,
        "cpu_count": os.cpu_count(),
        "model": args.model,
        "dtype": args.dtype,
        "attention": attention,
        "params": n_params,
        "batch": args.batch,
        "prompt": args.prompt,
        "new": args.new,
    }
    print(
        f"model: {n_params / 1e6:.1f}M parameters; batch {args.batch}, prompt {args.prompt}, "
        f"{args.new} new tokens; attention {attention}",
        flush=True,
    )

    # Rounds alternate the samplers, so that a change in the shared machine's speed during the
    # run hits each of them alike; the speed-up is the median of the per-round ratios.
    runners = {"vcppo_jax": jax_runner(config, params, prompts, lengths, args.new)}
    tmp = None
    peers = [p for p in args.peers.split(",") if p] if not args.skip_torch else []
    if peers:
        tmp = tempfile.TemporaryDirectory()
        hf.save_checkpoint(tmp.name, config32, params32)
        for cache in peers:
            name = "transformers" if cache == "dynamic" else f"transformers_{cache}"
            runners[name] = torch_runner(tmp.name, prompts, args.new, args.dtype, cache)
    times = {name: [] for name in runners}
    tokens = {}
    for r in range(args.repeats):
        for name, run in runners.items():
            traced = args.profile and name == "vcppo_jax" and r == args.repeats - 1
            with jax.profiler.trace(args.profile) if traced else contextlib.nullcontext():
                t, tokens[name] = run(r)
            times[name].append(t)
            print(
                f"  round {r + 1}: {name:18s} {generated / t:7.1f} tokens/s ({t:.1f} s)", flush=True
            )
    if tmp is not None:
        tmp.cleanup()
    for name, ts in times.items():
        report[f"{name}_seconds"] = ts
        report[f"{name}_tokens_per_s"] = generated / float(np.median(ts))
    names = list(times)
    print(f"{'':26s}" + "".join(f"{n:>20s}" for n in names))
    print(
        "  median tokens/s:        "
        + "".join(f"{report[f'{n}_tokens_per_s']:20.1f}" for n in names)
    )

    def per_round(slow, fast):
        return np.asarray(times[slow]) / np.asarray(times[fast])

    for peer in (n for n in names if n.startswith("transformers")):
        rounds = per_round(peer, "vcppo_jax")
        suffix = peer[len("transformers") :]
        report[f"speedup{suffix}"] = float(np.median(rounds))
        report[f"speedup{suffix}_per_round"] = [float(x) for x in rounds]
        agree = int(
            np.argmin(np.concatenate([(tokens["vcppo_jax"] == tokens[peer]).all(0), [False]]))
        )  # First column that differs.
        report[f"identical_leading_tokens{suffix}"] = agree
        print(
            f"  speed-up over {peer}: {report[f'speedup{suffix}']:.2f}x (median of rounds: "
            + ", ".join(f"{x:.2f}" for x in report[f"speedup{suffix}_per_round"])
            + f"); greedy tokens identical for the first {agree} positions of every row"
        )
    floor_bytes = decode_bytes_per_step(config, args.batch, args.prompt + args.new / 2)
    report["decode_bytes_per_step"] = floor_bytes
    bandwidth = BANDWIDTH.get(device_kind)
    if bandwidth:
        floor_tokens = args.batch * bandwidth / floor_bytes
        report["bandwidth_floor_tokens_per_s"] = floor_tokens
        report["share_of_bandwidth_floor"] = report["vcppo_jax_tokens_per_s"] / floor_tokens
        print(
            f"  memory floor ({bandwidth / 1e12:.2f} TB/s, {floor_bytes / 1e9:.2f} GB per step): "
            f"{floor_tokens:.0f} tokens/s; reached {report['share_of_bandwidth_floor']:.1%}"
        )

    mem = logprob_memory()
    report["logprob_peak_bytes"] = mem
    print("log-prob memory at [8, 4096], vocab 151,936 (XLA compiled temp + output):")
    print(f"  chunk size {mem['chunk_size']} positions")
    for k, v in mem.items():
        if k != "chunk_size":
            print(f"  {k:28s} {v / 2**30:8.2f} GiB")
    write_report(report, "sampling", args.out)


if __name__ == "__main__":
    main()
