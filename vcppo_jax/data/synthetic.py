"""A synthetic long chain-of-thought task: multi-term addition with every partial sum written.

    prompt:    "Add: 23 45 12 67 89 ="
    full:      " 23+45=68 ; 68+12=80 ; 80+67=147 ; 147+89=236 . Answer: 236"
    direct:    " Answer: 236"

The written steps make the problem easy (each is a two-number addition); answering directly
needs the whole sum at once, which a small model rarely gets right. So long reasoning is
genuinely useful and a short route exists, which is the situation where PPO's value
initialisation bias (favouring early stopping) can bite. Knobs: ``num_terms`` (the chain
length) and ``digits`` (the difficulty of each step). Answers are checked exactly.

``labels=True`` (the long regime) names every term with a letter, and every written step
starts by copying the named term from the prompt ("c7"), so finding the next term is a
look-up by name (the letter after the previous step's, then what follows that letter in the
prompt) rather than counting positions in a long prompt, which a small model learns far
more slowly. Each step stays one small addition of adjacent numbers; the whole sum stays
hard:

    prompt:    "Add: a3 b5 c7 d2 ="
    full:      " b5:3+5=8 ; c7:8+7=15 ; d2:15+2=17 . Answer: 17"
    direct:    " Answer: 17"

``carry_every=K`` (with labels; the long regime) makes every K-th step also restate the terms
still to add after ``|``, so a term is always found by name within the last K steps (in the
latest restated list, or the prompt) however long the chain: a look-up by name 250+ tokens
back is what a small model fails to learn. Restating costs about n^2 / (2K) items over a
chain of n terms; the whole sum stays as hard. With K = 1:

    prompt:    "Add: a3 b5 c7 d2 ="
    full:      " b5:3+5=8 | c7 d2 ; c7:8+7=15 | d2 ; d2:15+2=17 . Answer: 17"
    direct:    " Answer: 17"
"""

from __future__ import annotations

import dataclasses

import numpy as np

ANSWER_PREFIX = "Answer:"
LABELS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # Term names when labelled.


@dataclasses.dataclass(frozen=True)
class Problem:
    """One addition problem: prompt, answer, both kinds of solution and the terms."""

    prompt: str
    answer: str
    full_solution: str  # Every partial sum written, then the answer.
    direct_solution: str  # The answer alone.
    terms: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class AdditionTask:
    """The task's shape: chain length, digits per term, named terms and the restating cadence
    (see the module docstring)."""

    num_terms: int = 5
    digits: int = 2
    labels: bool = False
    carry_every: int = 0  # Restate the remaining terms every this many steps; 0 = never.

    def __post_init__(self):
        if self.num_terms < 2:
            raise ValueError(f"num_terms must be >= 2; got {self.num_terms}")
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits must be in [1, 6]; got {self.digits}")
        if self.labels and self.num_terms > len(LABELS):
            raise ValueError(
                f"num_terms must be <= {len(LABELS)} with labels (one letter per term); "
                f"got {self.num_terms}"
            )
        if self.carry_every < 0:
            raise ValueError(f"carry_every must be >= 0 (0 = off); got {self.carry_every}")
        if self.carry_every and not self.labels:
            raise ValueError("carry_every > 0 needs labels=True (the restated terms are named)")

    def _solution(self, terms: tuple[int, ...], wrong_step: int = 0, delta: int = 0) -> str:
        """Every partial sum written; step ``wrong_step`` (1-based, 0 = none) is off by
        ``delta``, and the error is carried to the answer."""
        steps, acc = [], terms[0]
        for i, t in enumerate(terms[1:], start=1):
            new = acc + t + (delta if i == wrong_step else 0)
            name = f"{LABELS[i]}{t}:" if self.labels else ""
            step = f"{name}{acc}+{t}={new}"
            if self.carry_every and i % self.carry_every == 0 and i + 1 < len(terms):
                step += " |" + "".join(f" {LABELS[j]}{terms[j]}" for j in range(i + 1, len(terms)))
            steps.append(step)
            acc = new
        return " " + " ; ".join(steps) + f" . {ANSWER_PREFIX} {acc}"

    def make(self, terms) -> Problem:
        """The problem for the given terms: its prompt, answer and both kinds of solution."""
        terms = tuple(int(t) for t in terms)
        answer = str(sum(terms))
        if self.labels:
            listed = " ".join(f"{LABELS[i]}{t}" for i, t in enumerate(terms))
        else:
            listed = " ".join(map(str, terms))
        return Problem(
            prompt="Add: " + listed + " =",
            answer=answer,
            full_solution=self._solution(terms),
            direct_solution=f" {ANSWER_PREFIX} {answer}",
            terms=terms,
        )

    def wrong_solution(self, problem: Problem, rng: np.random.Generator, full: bool) -> str:
        """A wrong response of the same shape (the reward model's negatives): for a written
        one, one partial sum off by 1-9 and carried to the answer; for a direct one, the
        answer off by 1-9."""
        if not full:
            wrong = int(problem.answer) + int(rng.choice([-1, 1]) * rng.integers(1, 10))
            return f" {ANSWER_PREFIX} {wrong}"
        k = int(rng.integers(1, len(problem.terms)))
        delta = int(rng.choice([-1, 1]) * rng.integers(1, 10))
        return self._solution(problem.terms, wrong_step=k, delta=delta)

    def sample(self, rng: np.random.Generator) -> Problem:
        """A random problem: ``num_terms`` terms of exactly ``digits`` digits (0-9 for one)."""
        lo = 10 ** (self.digits - 1) if self.digits > 1 else 0
        return self.make(rng.integers(lo, 10**self.digits, size=self.num_terms))

    def problems(self, n: int, seed: int) -> list[Problem]:
        """``n`` random problems drawn from ``seed`` (the same seed gives the same problems)."""
        rng = np.random.default_rng(seed)
        return [self.sample(rng) for _ in range(n)]

    def corpus(self, n: int = 2000, seed: int = 0) -> list[str]:
        """Text to train the tokenizer on: prompts with both kinds of solution."""
        out = []
        for p in self.problems(n, seed):
            out += [p.prompt + p.full_solution, p.prompt + p.direct_solution]
        return out


def mixed_length_problems(
    task: AdditionTask, n: int, seed: int, rng: np.random.Generator, min_terms: int = 0
) -> list[Problem]:
    """``n`` problems: with ``min_terms`` > 0 each of a chain length drawn uniformly from
    ``[min_terms, task.num_terms]`` with ``rng``, else ``task.problems(n, seed)``."""
    if not (min_terms and min_terms < task.num_terms):
        return task.problems(n, seed)
    lengths = rng.integers(min_terms, task.num_terms + 1, size=n)
    tasks = {k: dataclasses.replace(task, num_terms=int(k)) for k in set(lengths.tolist())}
    return [tasks[int(k)].sample(rng) for k in lengths]


def sft_examples(
    task: AdditionTask, n: int, seed: int, direct_fraction: float, min_terms: int = 0
) -> list[tuple[str, str]]:
    """(prompt, response) pairs; ``direct_fraction`` of them take the short route.

    ``min_terms`` > 0: each problem's chain length is drawn uniformly from
    ``[min_terms, task.num_terms]`` (shorter chains teach the same steps for less compute)."""
    rng = np.random.default_rng(seed)
    problems = mixed_length_problems(task, n, seed, rng, min_terms)
    out = []
    for p in problems:
        direct = rng.random() < direct_fraction
        out.append((p.prompt, p.direct_solution if direct else p.full_solution))
    return out
