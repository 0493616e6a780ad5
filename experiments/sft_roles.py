"""Where does an SFT policy err on written solutions? Teacher-forced probability by token role.

    python -m experiments.sft_roles --sft workdirs/study_long/sft/seed_0 [--prompts 64]

Feeds the held-out problems' correct written solutions to the policy exported by an SFT run
(``WORKDIR/sft_policy``) and reports the mean probability the policy gives each correct token,
grouped by the token's role in its step (``c7:13+7=20 ;``: the label ``c``, the term copied
from the prompt ``7``, the partial sum carried from the previous step ``13``, the term again
after ``+``, the new partial sum ``20``, the separators; with ``data.carry_every`` also the terms
restated after ``|``), and for the term look-up also by step index (groups of 5 steps). A
chain of n steps is right only if every token is, so one weak role explains a low greedy
accuracy. The config is the SFT run's own (its ``config.json``); writes ``--out`` (JSON) when
given.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import tempfile

import ml_collections
import numpy as np

ROLE_AFTER = {  # A digit's role follows from the last non-digit token before it.
    "label": "term (look-up)",
    ":": "partial sum carried",
    "+": "term (copied again)",
    "=": "new partial sum",
    "answer": "answer",
}


def token_roles(pieces: list[str]) -> list[str]:
    """The role of each token of a written solution, from its decoded pieces. With
    ``data.carry``, the terms restated after ``|`` are "carried label" / "carried term"."""
    roles, last, carried = [], None, False
    for s in pieces:
        t = s.strip()
        if not t:  # A bare word-boundary piece: part of what follows.
            roles.append("separator")
            continue
        if t.isdigit():
            role = "carried term" if carried else ROLE_AFTER.get(last, "other digit")
            roles.append(role)
            continue
        if len(t) == 1 and t.isalpha():
            last = "label"
        elif "Answer" in t:
            last = "answer"
        elif t in (":", "+", "="):
            last = t
        else:
            last = "separator"
            if t in ("|", ";", "."):  # A carried list runs from "|" to the step's end.
                carried = t == "|"
        if carried and last == "label":
            roles.append("carried label")
        else:
            roles.append({"label": "label", "answer": "answer prefix"}.get(last, "separator"))
    return roles


def _update(config: ml_collections.ConfigDict, saved: dict) -> None:
    for k, v in saved.items():
        if k not in config:
            continue
        if isinstance(v, dict) and isinstance(config[k], ml_collections.ConfigDict):
            _update(config[k], v)
        else:
            with config.ignore_type():
                config[k] = tuple(tuple(x) for x in v) if k == "rules" else v


@contextlib.contextmanager
def sft_experiment(sft_dir: str):
    """-> an ``Experiment`` under the SFT run's own config (its ``config.json``) holding the
    policy it exported, in a temporary workdir."""
    from configs import vcppo
    from vcppo_jax import runner

    with open(os.path.join(sft_dir, "config.json")) as f:
        saved = json.load(f)
    # Today's fields (a run written before a field existed ran at its default), its values.
    config = vcppo.get_config(saved.get("variant") or "tiny")
    _update(config, saved)
    config.sft.init_from = sft_dir
    config.ppo.steps = 0
    with tempfile.TemporaryDirectory() as wd:
        exp = runner.Experiment(config, wd)
        exp.restore()
        yield exp


def measure(sft_dir: str, prompts: int) -> dict:
    from vcppo_jax import updates

    with sft_experiment(sft_dir) as exp:
        problems = exp.source.eval_problems(prompts)
        b = exp._encoded_pairs([p.prompt for p in problems], [p.full_solution for p in problems])
        lp = np.asarray(
            updates.score_rollout(exp.model_config, exp.states.policy.params, b.tokens, b.positions)
        )
        tok = exp.tokenizer
        by_role, lookup = collections.defaultdict(list), collections.defaultdict(list)
        for i, p in enumerate(problems):
            ids = tok.encode(p.full_solution, add_eos=True)
            roles = token_roles([tok.decode([t]) for t in ids])
            k = 0
            for j, role in enumerate(roles):
                prob = float(np.exp(lp[i, j]))
                by_role[role].append(prob)
                if role == "term (look-up)" and (j == 0 or roles[j - 1] == "label"):
                    lookup[k // 5].append(prob)
                    k += 1
    return {
        "sft": sft_dir,
        "prompts": prompts,
        "mean_probability_by_role": {r: float(np.mean(v)) for r, v in sorted(by_role.items())},
        "share_below_half_by_role": {
            r: float(np.mean(np.array(v) < 0.5)) for r, v in sorted(by_role.items())
        },
        "lookup_probability_by_step_group_of_5": [
            float(np.mean(v)) for _, v in sorted(lookup.items())
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", required=True, help="an SFT run's workdir")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the result here (JSON)")
    args = parser.parse_args()
    result = measure(args.sft, args.prompts)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
