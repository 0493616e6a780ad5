"""A synthetic long chain-of-thought task: multi-term addition with every partial sum written.

    prompt:    "Add: 23 45 12 67 89 ="
    full:      " 23+45=68 ; 68+12=80 ; 80+67=147 ; 147+89=236 . Answer: 236"
    direct:    " Answer: 236"

The written steps make the problem easy (each is a two-number addition); answering directly
needs the whole sum at once, which a small model rarely gets right. So long reasoning is
genuinely useful and a short route exists, which is the situation where PPO's value
initialisation bias (favouring early stopping) can bite. Knobs: ``num_terms`` (the chain
length) and ``digits`` (the difficulty of each step). Answers are checked exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ANSWER_PREFIX = "Answer:"


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    full_solution: str  # Every partial sum written, then the answer.
    direct_solution: str  # The answer alone.
    terms: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class AdditionTask:
    num_terms: int = 5
    digits: int = 2

    def __post_init__(self):
        if self.num_terms < 2:
            raise ValueError(f"num_terms must be >= 2; got {self.num_terms}")
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits must be in [1, 6]; got {self.digits}")

    def make(self, terms) -> Problem:
        terms = tuple(int(t) for t in terms)
        steps, acc = [], terms[0]
        for t in terms[1:]:
            steps.append(f"{acc}+{t}={acc + t}")
            acc += t
        answer = str(acc)
        return Problem(
            prompt="Add: " + " ".join(map(str, terms)) + " =",
            answer=answer,
            full_solution=" " + " ; ".join(steps) + f" . {ANSWER_PREFIX} {answer}",
            direct_solution=f" {ANSWER_PREFIX} {answer}",
            terms=terms,
        )

    def sample(self, rng: np.random.Generator) -> Problem:
        lo = 10 ** (self.digits - 1) if self.digits > 1 else 0
        return self.make(rng.integers(lo, 10**self.digits, size=self.num_terms))

    def problems(self, n: int, seed: int) -> list[Problem]:
        rng = np.random.default_rng(seed)
        return [self.sample(rng) for _ in range(n)]

    def corpus(self, n: int = 2000, seed: int = 0) -> list[str]:
        """Text to train the tokenizer on: prompts with both kinds of solution."""
        out = []
        for p in self.problems(n, seed):
            out += [p.prompt + p.full_solution, p.prompt + p.direct_solution]
        return out


def sft_examples(
    task: AdditionTask, n: int, seed: int, direct_fraction: float
) -> list[tuple[str, str]]:
    """(prompt, response) pairs; ``direct_fraction`` of them take the short route."""
    rng = np.random.default_rng(seed)
    out = []
    for p in task.problems(n, seed):
        direct = rng.random() < direct_fraction
        out.append((p.prompt, p.direct_solution if direct else p.full_solution))
    return out
