"""Sampling throughput beside transformers' ``generate``, and log-prob memory, in one run.

    python -m benchmarks.sampling [--batch 32] [--prompt 64] [--new 256] [--skip_torch]

1. Generated tokens per second for a ~100M-parameter Qwen2-shaped model with random weights
   (hidden 768, 12 layers, 12 heads / 2 KV heads, MLP 2048, vocabulary 32768, tied
   embeddings), float32, greedy, every row generating exactly ``--new`` tokens (no EOS). The
   samplers alternate over ``--repeats`` rounds; the speed-up is the median of the per-round
   ratios.
   Peer: transformers ``generate`` (PyTorch CPU, KV cache, ``do_sample=False``) on the same
   weights, exported with ``hf.save_checkpoint`` and loaded with ``from_pretrained``. The
   first tokens of both are compared, so the two runs do the same work.
2. Peak memory of the log-prob head (hidden states -> log p of given tokens) at ``[8, 4096]``
   with a 151,936-token vocabulary (Qwen2.5) and hidden size 896: chunked (as
   ``token_logprobs`` does, default chunk size) against materialising the whole logits
   tensor, from XLA's compiled memory analysis (compiled, not run: unchunked needs ~20 GB).

Writes ``benchmarks/results/sampling_<backend>.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import write_report
from vcppo_jax import models, sampling
from vcppo_jax.models import ModelConfig, hf

BENCH_MODEL = ModelConfig(
    vocab_size=32768,
    hidden_size=768,
    intermediate_size=2048,
    num_layers=12,
    num_heads=12,
    num_kv_heads=2,
    qkv_bias=True,
    tie_word_embeddings=True,
    model_type="qwen2",
    rope_theta=1e6,
    max_position_embeddings=4096,
)


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


def torch_runner(path, prompts, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    kw = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # Warm-up.

    def run(seed=0):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            return time.perf_counter() - t0, out[:, ids.shape[1] :].numpy()

    return run


def logprob_memory(batch=8, length=4096, vocab=151936, hidden=896):
    """Peak memory of the log-prob head (final hidden states -> log p of the given tokens),
    the part that chunking changes; the backbone's own activations are the same either way."""
    from vcppo_jax.models import _chunked_logprobs

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

    def chunked(p, h, t):
        return _chunked_logprobs(config, p, h, t, 1.0, chunk, False)[0]

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
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (samplers alternate)")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config = BENCH_MODEL
    params = models.init_params(config, jax.random.key(0))
    n_params = count_params(params)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, size=(args.batch, args.prompt)).astype(np.int32)
    lengths = np.full((args.batch,), args.prompt, np.int32)
    generated = args.batch * args.new
    report = {
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "params": n_params,
        "batch": args.batch,
        "prompt": args.prompt,
        "new": args.new,
    }
    print(
        f"model: {n_params / 1e6:.1f}M parameters; batch {args.batch}, prompt {args.prompt}, "
        f"{args.new} new tokens",
        flush=True,
    )

    # Rounds alternate the samplers, so that a change in the shared machine's speed during the
    # run hits each of them alike; the speed-up is the median of the per-round ratios.
    runners = {"vcppo_jax": jax_runner(config, params, prompts, lengths, args.new)}
    tmp = None
    if not args.skip_torch:
        tmp = tempfile.TemporaryDirectory()
        hf.save_checkpoint(tmp.name, config, params)
        runners["transformers"] = torch_runner(tmp.name, prompts, args.new)
    times = {name: [] for name in runners}
    tokens = {}
    for r in range(args.repeats):
        for name, run in runners.items():
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

    if "transformers" in times:
        rounds = per_round("transformers", "vcppo_jax")
        report["speedup"] = float(np.median(rounds))
        report["speedup_per_round"] = [float(x) for x in rounds]
        agree = int(
            np.argmin(
                np.concatenate([(tokens["vcppo_jax"] == tokens["transformers"]).all(0), [False]])
            )
        )  # First column that differs.
        report["identical_leading_tokens"] = agree
        print(
            f"  speed-up over transformers: {report['speedup']:.2f}x (median of rounds: "
            + ", ".join(f"{x:.2f}" for x in report["speedup_per_round"])
            + f"); greedy tokens identical for the first {agree} positions of every row"
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
