"""Held-out evaluation of the policy: greedy and sampled accuracy, pass@k, lengths, the share
and accuracy of each route, and (synthetic task) the greedy accuracy of each route forced."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from vcppo_jax import rollout
from vcppo_jax.stages import Context


@dataclasses.dataclass(frozen=True)
class Settings:
    """Evaluation's config fields (``eval.*``)."""

    num_prompts: int
    num_samples: int  # Sampled answers per prompt: sampled accuracy and pass@k.
    route_accuracy: bool  # Also the greedy accuracy of each route, forced.


def evaluate(ctx: Context, policy_params, settings: Settings, key: jax.Array) -> dict:
    """The evaluation metrics of ``policy_params`` on the source's held-out problems."""
    problems = ctx.source.eval_problems(settings.num_prompts)
    greedy, _, g_correct = ctx.sample(policy_params, problems, key, ctx.greedy_params)
    k = settings.num_samples
    many = [p for p in problems for _ in range(k)]
    sampled, _, s_correct = ctx.sample(policy_params, many, key, ctx.sampling_params)
    s = s_correct.reshape(-1, k)
    out = {
        "eval/accuracy": float(g_correct.mean()),
        "eval/response_length": float(np.mean(greedy.lengths)),
        "eval/accuracy_sampled": float(s.mean()),
        f"eval/pass_at_{k}": float(s.any(1).mean()),
        "eval/response_length_sampled": float(np.mean(sampled.lengths)),
        **rollout.route_metrics("eval", sampled.direct, s_correct),
    }
    if settings.route_accuracy:
        # Greedy accuracy of each route, the route forced by writing its first tokens.
        for route, forced in zip(
            ("direct", "written"), route_prefixes(ctx.tokenizer, problems), strict=True
        ):
            _, _, ok = ctx.sample(policy_params, problems, key, ctx.greedy_params, forced)
            out[f"eval/accuracy_greedy_{route}_route"] = float(ok.mean())
    return out


def route_prefixes(tokenizer, problems) -> tuple[list[list[int]], list[list[int]]]:
    """Per problem, the response tokens that commit to the direct and to the written route:
    the shortest start of each solution's tokens whose text the other route cannot begin
    with (" Answer:" and " b" on the labelled task)."""

    def commit(solution: str, other: str) -> list[int]:
        ids = tokenizer.encode(solution)
        for k in range(1, len(ids) + 1):
            if not other.strip().startswith(tokenizer.decode(ids[:k]).strip()):
                return ids[:k]
        return ids

    direct = [commit(p.direct_solution, p.full_solution) for p in problems]
    written = [commit(p.full_solution, p.direct_solution) for p in problems]
    return direct, written
