"""Decoupled GAE speed, beside the formulations peers use, in one run.

    python -m benchmarks.gae [--shapes 256x8192,512x16384] [--repeats 5] [--out FILE]

Rows (all float32, both lambdas computed: actor 0.95, critic 1.0, gamma 1.0; every row is
timed as the median of ``--repeats`` interleaved runs after a warm-up/compile run):

* ``vcppo_jax``: ``decoupled_gae`` as users call it (method ``auto``: ``matmul`` for scalar
  and ``[B]`` lambdas, ``associative`` for ``[B, T]`` ones), each explicit method, and ``[B]``
  / ``[B, T]`` actor lambdas.
* ``torch loop``: the reverse Python loop over time on [B] slices used by verl, OpenRLHF and
  TRL, run once per lambda (they compute one lambda at a time).
* ``rlax vmap``: ``rlax.truncated_generalized_advantage_estimation`` vmapped over the batch and
  jitted, one pass per lambda.
* ``floor``: one jitted element-wise pass that reads three [B, T] arrays and writes two: the
  memory traffic any implementation must pay.

Prints a table with ratios and writes JSON (default ``benchmarks/results/gae_<backend>.json``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import write_report
from vcppo_jax.advantages import decoupled_gae, length_adaptive_lambda

GAMMA, LAM_A, LAM_C = 1.0, 0.95, 1.0


def time_all(fns: dict, repeats: int) -> dict:
    """Median seconds per function. Runs are interleaved (round robin) so that slow phases of
    a shared machine hit every row alike, rather than whichever row happened to run then."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # Warm-up and compile.
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def torch_gae_loop(rewards, values, mask, gamma, lam):
    """verl-style: reverse loop over time; returns = advantages + values."""
    import torch

    with torch.no_grad():
        t = rewards.shape[1]
        next_value = torch.zeros_like(rewards[:, 0])
        last = torch.zeros_like(rewards[:, 0])
        out = []
        for s in reversed(range(t)):
            delta = rewards[:, s] + gamma * next_value - values[:, s]
            last_new = delta + gamma * lam * last
            next_value = values[:, s] * mask[:, s] + (1 - mask[:, s]) * next_value
            last = last_new * mask[:, s] + (1 - mask[:, s]) * last
            out.append(last)
        adv = torch.stack(out[::-1], dim=1)
        return adv, adv + values


def make_rlax_gae():
    import rlax

    def one(r, v, m, lam):
        values = jnp.concatenate([v * m, jnp.zeros((1,), v.dtype)])
        return rlax.truncated_generalized_advantage_estimation(
            r * m, jnp.full_like(r, GAMMA), lam, values
        )

    batched = jax.vmap(one, in_axes=(0, 0, 0, None))

    @jax.jit
    def run(r, v, m):
        adv = batched(r, v, m, LAM_A)  # Pass 1: actor lambda.
        ret = batched(r, v, m, LAM_C) + v * m  # Pass 2: critic lambda.
        return adv * m, ret

    return run


@jax.jit
def memory_floor(r, v, m):
    return r * m + v, v * m - r


def bench_shape(b: int, t: int, repeats: int, skip_torch: bool) -> dict:
    rng = np.random.default_rng(0)
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask_np = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    rew_np = np.zeros((b, t), np.float32)
    rew_np[np.arange(b), lengths - 1] = rng.choice([-1.0, 1.0], size=b)
    val_np = rng.normal(size=(b, t)).astype(np.float32)
    r, v, m = (jnp.asarray(x) for x in (rew_np, val_np, mask_np))
    lam_rows = length_adaptive_lambda(jnp.asarray(lengths), 0.05)
    lam_tokens = jnp.broadcast_to(lam_rows[:, None], (b, t))

    def ours(method, lam_a=LAM_A):
        return lambda: decoupled_gae(
            r, v, m, gamma=GAMMA, lambda_actor=lam_a, lambda_critic=LAM_C, method=method
        )

    rlax_gae = make_rlax_gae()
    fns = {
        "vcppo_jax auto (scalar lambdas)": ours("auto"),
        "vcppo_jax matmul": ours("matmul"),
        "vcppo_jax associative": ours("associative"),
        "vcppo_jax scan": ours("scan"),
        "vcppo_jax auto, [B] lambda (VAPO)": ours("auto", lam_rows),
        "vcppo_jax auto, [B, T] lambda": ours("auto", lam_tokens),
        "rlax vmap (2 passes)": lambda: rlax_gae(r, v, m),
        "floor (read 3, write 2)": lambda: memory_floor(r, v, m),
    }
    rows = time_all(fns, repeats)
    if not skip_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        tr, tv, tm = (torch.from_numpy(x) for x in (rew_np, val_np, mask_np))

        def torch_both():
            torch_gae_loop(tr, tv, tm, GAMMA, LAM_A)
            return torch_gae_loop(tr, tv, tm, GAMMA, LAM_C)

        rows.update(time_all({"torch loop (2 passes)": torch_both}, max(1, repeats // 3)))

    # Correctness of what was timed: ours equals the rlax formulation here.
    want = rlax_gae(r, v, m)
    got = decoupled_gae(r, v, m, gamma=GAMMA, lambda_actor=LAM_A, lambda_critic=LAM_C)
    err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want, strict=True))
    return {"shape": [b, t], "seconds": rows, "max_abs_diff_vs_rlax": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="256x8192,512x16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    backend = jax.default_backend()
    report = {
        "backend": backend,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "results": [],
    }
    for spec in args.shapes.split(","):
        b, t = (int(x) for x in spec.lower().split("x"))
        print(f"[{b}, {t}] float32 ...", flush=True)
        res = bench_shape(b, t, args.repeats, args.skip_torch)
        report["results"].append(res)
        ours = res["seconds"]["vcppo_jax auto (scalar lambdas)"]
        print(f"  {'implementation':40s} {'ms':>10s} {'vs vcppo_jax':>13s}")
        for name, sec in res["seconds"].items():
            print(f"  {name:40s} {sec * 1e3:10.2f} {sec / ours:12.2f}x")
        print(f"  max |diff| vs rlax: {res['max_abs_diff_vs_rlax']:.2e}")
    write_report(report, "gae", args.out)


if __name__ == "__main__":
    main()
