"""Does an SFT backbone hold what a reward model needs? Frozen-feature probes of right vs wrong.

    python -m experiments.rm_probe --sft workdirs/study_long/sft/seed_0 [--train_problems 512]

The reward model (``stages/reward_model.py``) fine-tunes the policy's backbone and reads one
score from the last token (EOS). Where it stays at chance, this tells apart two reasons: the
backbone lacks the information, or training fails to gather it at EOS. On the reward model's
own data (each problem answered right and wrong on each route, the wrong written answer one
partial sum off and carried on, ``AdditionTask.wrong_solution``) it fits a logistic regression
(NumPy, standardised features, L2) on ``--train_problems`` training problems and scores the
reward model's held-out set (``reward_model.heldout_set``, 64 problems x 4 answers), per route,
for these frozen features of the SFT policy:

* ``eos_hidden``: the final hidden state at EOS, what the reward model's value head reads;
* ``mean_hidden``: the hidden state averaged over the response tokens;
* ``min_logprob``: the policy's lowest log-probability of a response token (a slip in a
  partial sum is a token the policy would not have written), and ``sum_logprob``.

The config is the SFT run's own (its ``config.json``); ``--out`` writes the result (JSON).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from experiments.sft_roles import sft_experiment

FEATURES = ("eos_hidden", "mean_hidden", "min_logprob", "sum_logprob")


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 2000):
    """-> (mean, scale, weights, bias) of an L2 logistic regression of y (bool) on x [M, F],
    fitted by gradient descent on standardised features (Nesterov momentum, fixed step)."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    w, b = np.zeros(z.shape[1]), 0.0
    vw, vb = np.zeros_like(w), 0.0
    lr, mom = 0.5, 0.9
    t = y.astype(np.float64)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ (w + mom * vw) + (b + mom * vb))))
        gw = z.T @ (p - t) / len(t) + l2 * (w + mom * vw)
        gb = float(np.mean(p - t))
        vw, vb = mom * vw - lr * gw, mom * vb - lr * gb
        w, b = w + vw, b + vb
    return mean, scale, w, b


def predict(model, x: np.ndarray) -> np.ndarray:
    mean, scale, w, b = model
    return ((x - mean) / scale) @ w + b > 0


def features(exp, prompts: list[str], responses: list[str], chunk: int = 32) -> dict:
    """Frozen SFT-policy features of each (prompt, response) -> {name: [M, F]}."""
    import jax.numpy as jnp

    from vcppo_jax import models, updates

    model = models.Transformer(exp.model_config, head="lm")
    params = exp.states.policy.params
    out = {k: [] for k in FEATURES}
    for i in range(0, len(prompts), chunk):
        b = exp._encoded_pairs(prompts[i : i + chunk], responses[i : i + chunk])
        tokens, positions = np.asarray(b.tokens), np.asarray(b.positions)
        mask = np.asarray(b.mask) > 0
        rows = np.arange(len(b.lengths))
        hidden, _ = model.apply({"params": params}, jnp.asarray(tokens))
        hidden = np.asarray(hidden, np.float64)  # [B, T, E]
        resp = hidden[rows[:, None], positions]  # [B, N, E] at the response slots
        out["eos_hidden"].append(resp[rows, b.lengths - 1])
        out["mean_hidden"].append((resp * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
        lp = np.asarray(
            updates.score_rollout(exp.model_config, params, b.tokens, b.positions), np.float64
        )
        out["min_logprob"].append(np.where(mask, lp, np.inf).min(1, keepdims=True))
        out["sum_logprob"].append(np.where(mask, lp, 0.0).sum(1, keepdims=True))
    return {k: np.concatenate(v) for k, v in out.items()}


def measure(sft_dir: str, train_problems: int, eval_problems: int = 64) -> dict:
    from vcppo_jax.stages import reward_model

    with sft_experiment(sft_dir) as exp:
        train = reward_model.answered_four_ways(
            exp.task, exp.task.problems(train_problems, 12345), np.random.default_rng(0)
        )
        held = reward_model.heldout_set(exp.task, eval_problems)
        f_train = features(exp, train[0], train[1])
        f_held = features(exp, held[0], held[1])
    result = {"sft": sft_dir, "train_answers": len(train[2]), "heldout_answers": len(held[2])}
    for name in FEATURES:
        row = {}
        for route, sel_train, sel_held in (
            ("both", np.ones_like(train[3]), np.ones_like(held[3])),
            ("written", train[3], held[3]),
            ("direct", ~train[3], ~held[3]),
        ):
            m = fit_logistic(f_train[name][sel_train], train[2][sel_train])
            row[f"train_{route}"] = float(
                np.mean(predict(m, f_train[name][sel_train]) == train[2][sel_train])
            )
            row[f"heldout_{route}"] = float(
                np.mean(predict(m, f_held[name][sel_held]) == held[2][sel_held])
            )
        result[name] = row
        print(
            f"{name:12s} held-out accuracy: both {row['heldout_both']:.3f}, written "
            f"{row['heldout_written']:.3f}, direct {row['heldout_direct']:.3f} (train both "
            f"{row['train_both']:.3f})",
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", required=True, help="an SFT run's workdir")
    parser.add_argument("--train_problems", type=int, default=512)
    parser.add_argument("--out", default=None, help="write the result here (JSON)")
    args = parser.parse_args()
    result = measure(args.sft, args.train_problems)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
