"""Score a finished run's reward model on the held-out set again, with the current metrics.

    python -m experiments.rm_heldout --workdir workdirs/rm_first_slip_600 [--out FILE.json]

Restores the run's latest checkpoint from a temporary copy of its workdir (the run itself is
left untouched) with the run's own ``config.json``, and prints every ``rm/heldout_*`` metric of
stages/reward_model.py: sign accuracy and margin by each way of reading a response's score, and
the threshold-free pair accuracy (right answer above its wrong one). For runs whose logged
metrics predate a metric.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import ml_collections


def score(workdir: str) -> dict[str, float]:
    from vcppo_jax import runner
    from vcppo_jax.stages import reward_model as reward_model_stage

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(os.path.join(workdir, "checkpoints")) or not os.path.exists(path):
        raise SystemExit(f"error: {workdir} holds no checkpoints/ and config.json of a run")
    with open(path) as f:
        raw = json.load(f)
    raw.pop("resolved", None)
    config = ml_collections.ConfigDict(raw)
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "run")
        shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("tensorboard", "*.lock"))
        exp = runner.Experiment(config, copy)
        stage_index, _ = exp.restore()
        if "reward_model" not in exp.stages or stage_index < exp.stages.index("reward_model"):
            raise SystemExit(f"error: {workdir}'s checkpoint has no trained reward model")
        return reward_model_stage.evaluate(exp.ctx, exp.states.reward_model, exp.rm_settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    got = score(args.workdir)
    for k, v in sorted(got.items()):
        print(f"{k:44s} {v:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workdir": args.workdir, **got}, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
