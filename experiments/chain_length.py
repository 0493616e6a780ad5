"""Does writing the steps help? Accuracy of the SFT policy by route and chain length.

    python -m experiments.chain_length --out workdirs/chain_length [--terms 2,3,5,7] [--seed 0]

For each number of terms, trains the tiny SFT policy (``configs/vcppo.py:tiny``, same budget)
with an ordinary ``vcppo_jax.main`` run, then reads its held-out evaluation at the start of
PPO: sampled answers split by route, the written chain (every partial sum) against the direct
answer. Writes ``OUT/chain_length.json`` and ``OUT/chain_length.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from vcppo_jax.metrics import read_metrics


def run_one(out: str, terms: int, seed: int) -> dict:
    wd = os.path.join(out, f"terms_{terms}_seed_{seed}")
    cmd = [
        sys.executable,
        "-m",
        "vcppo_jax.main",
        "--config=configs/vcppo.py:tiny",
        f"--workdir={wd}",
        f"--config.seed={seed}",
        f"--config.data.num_terms={terms}",
        "--config.ppo.steps=1",
        "--config.critic.init=policy",
        "--config.eval.num_samples=8",
        f"--config.rollout.max_new_tokens={16 * terms + 16}",
    ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    first_eval = next(r for r in read_metrics(wd) if r["stage"] == "eval")
    return {
        "terms": terms,
        "seed": seed,
        **{k: v for k, v in first_eval.items() if k.startswith("eval/")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--terms", default="2,3,5,7")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = [run_one(args.out, int(t), args.seed) for t in args.terms.split(",")]
    with open(os.path.join(args.out, "chain_length.json"), "w") as f:
        json.dump(results, f, indent=2)
    fmt = lambda v: "n/a" if v is None or v < 0 else f"{100 * v:.0f}%"
    lines = [
        "| terms | greedy accuracy | sampled: written route | sampled: direct route | "
        "direct share |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['terms']} | {fmt(r['eval/accuracy'])} | "
            f"{fmt(r['eval/accuracy_written_route'])} | {fmt(r['eval/accuracy_direct_route'])} | "
            f"{fmt(r['eval/direct_fraction'])} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, "chain_length.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
