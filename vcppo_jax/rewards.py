"""Answer extraction and verification -> a terminal reward on the last response token.

Extraction tries, in order: the last ``\\boxed{...}``, the last ``Answer: ...`` line, the last
number. Verification is exact (after normalising whitespace and numbers) for the synthetic tasks,
and ``math-verify`` for LaTeX answers, run in a process pool with a per-answer timeout: a
verifier that hangs or crashes scores as incorrect and is counted.

The timeout is each answer's own: its clock starts when a worker starts that answer (a
``SIGALRM`` timer in the worker), so answers queued behind slow ones are never charged for
the wait, and identical input gives identical counts. A worker stuck where the timer cannot
reach it (inside C code) is caught by a batch deadline on the caller's side, which allows
every answer its full timeout: ``ceil(B / workers)`` rounds of ``timeout_s`` plus
``BATCH_SLACK_S``.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import multiprocessing
import re
import signal
import time

import numpy as np

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # Unbalanced: no answer.


def extract_answer(text: str) -> str | None:
    """The answer in ``text``: the last ``\\boxed{...}``, else the rest of the line after the
    last ``Answer:`` (None if that is empty), else the last number; None if there is none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    idx = text.rfind("Answer:")
    if idx >= 0:
        rest = text[idx + len("Answer:") :].strip().splitlines()
        if rest and rest[0].strip():
            return rest[0].strip().rstrip(".").strip()
        return None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalise(ans: str) -> str:
    """``ans`` without spaces and commas, a number written canonically (``"3.0"`` -> ``"3"``)."""
    ans = ans.strip().replace(" ", "").replace(",", "")
    try:
        value = float(ans)
        return str(int(value)) if value.is_integer() else str(value)
    except ValueError:
        return ans


def exact_match(text: str, gold: str) -> bool:
    """True when the answer extracted from ``text`` equals ``gold`` after ``normalise``."""
    pred = extract_answer(text)
    return pred is not None and normalise(pred) == normalise(gold)


def _math_verify_one(pred_text: str, gold: str) -> bool:
    from math_verify import parse, verify

    gold_expr = gold if "\\boxed" in gold or "$" in gold else f"\\boxed{{{gold}}}"
    return bool(verify(parse(gold_expr), parse(pred_text)))


def _start_verifier_worker(barrier, load_math_verify: bool, verify_fn) -> None:
    """Pool initializer: import math-verify (seconds on a busy machine) and wait until every
    worker has, so that start-up never counts against an answer's timeout. ``verify_fn``
    arrives pickled by reference: receiving it has imported its module here already."""
    del verify_fn
    if load_math_verify:
        try:
            import math_verify  # noqa: F401
        except ImportError:  # Each answer then fails alone and is counted as an error.
            pass
    barrier.wait()


def _ready() -> bool:
    return True


STARTUP_TIMEOUT_S = 300.0
BATCH_SLACK_S = 10.0  # Beyond the batch's rounds of timeouts: process and pickling overhead.


class _AnswerTimeout(Exception):
    """Raised in a worker when one answer's own time runs out."""


def _on_alarm(signum, frame):
    raise _AnswerTimeout


def _timed_verify(verify_fn, timeout_s: float, text: str, gold: str) -> str:
    """In a worker: ``verify_fn(text, gold)`` with a clock that starts now. -> "correct",
    "wrong", "timeout" or "error" (the verifier raised)."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            return "correct" if verify_fn(text, gold) else "wrong"
        except _AnswerTimeout:
            return "timeout"
        except Exception:
            return "error"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _AnswerTimeout:  # The alarm fired between the answer's end and the timer's reset.
        return "timeout"
    finally:
        signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass
class VerifyResult:
    """Correctness ``[B]`` of each response, and how many checks timed out or raised."""

    correct: np.ndarray  # [B] bool
    timeouts: int
    errors: int


class MathVerifier:
    """``math-verify`` in a pool of worker processes with a per-answer timeout."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, verify_fn=None):
        """``verify_fn(pred_text, gold) -> bool`` (a picklable top-level function) replaces
        math-verify, e.g. in tests."""
        self.timeout_s = timeout_s
        self.workers = workers
        self.verify_fn = verify_fn or _math_verify_one
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            pool = cf.ProcessPoolExecutor(
                self.workers,
                mp_context=ctx,
                initializer=_start_verifier_worker,
                initargs=(
                    ctx.Barrier(self.workers),
                    self.verify_fn is _math_verify_one,
                    self.verify_fn,
                ),
            )
            # Start every worker (one task each; the barrier holds them until all are up) before
            # any per-answer clock runs: a first call on a loaded machine once timed out on
            # worker start-up alone, so two identical runs counted different timeouts.
            try:
                for fut in [pool.submit(_ready) for _ in range(self.workers)]:
                    fut.result(timeout=STARTUP_TIMEOUT_S)
            except cf.TimeoutError as e:
                pool.shutdown(wait=False, cancel_futures=True)
                raise RuntimeError(
                    f"the answer-verifier pool ({self.workers} processes) did not start within "
                    f"{STARTUP_TIMEOUT_S:.0f} s"
                ) from e
            self._pool = pool
        return self._pool

    def _reset(self):
        if self._pool is not None:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                p.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __call__(self, texts: list[str], golds: list[str]) -> VerifyResult:
        pool = self._get_pool()
        pairs = zip(texts, golds, strict=True)
        futures = [
            pool.submit(_timed_verify, self.verify_fn, self.timeout_s, t, g) for t, g in pairs
        ]
        rounds = math.ceil(len(texts) / self.workers)
        deadline = time.monotonic() + rounds * self.timeout_s + BATCH_SLACK_S
        correct = np.zeros(len(texts), bool)
        timeouts = errors = 0
        hung = False
        for i, fut in enumerate(futures):
            try:
                outcome = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except cf.TimeoutError:  # Stuck beyond the timer's reach (in C code).
                outcome, hung = "timeout", True
            except Exception:  # The worker process itself died.
                outcome = "error"
            correct[i] = outcome == "correct"
            timeouts += outcome == "timeout"
            errors += outcome == "error"
        if hung:  # A stuck worker would block later calls: start a fresh pool.
            self._reset()
        return VerifyResult(correct, timeouts, errors)

    def close(self):
        """Shuts the worker pool down, waiting for it; a later call starts a new one."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def terminal_rewards(
    correct: np.ndarray,
    response_mask: np.ndarray,
    *,
    correct_reward: float = 1.0,
    incorrect_reward: float = -1.0,
    max_length: int | None = None,
    overlong_buffer: int = 0,
    overlong_penalty: float = 1.0,
    has_answer: np.ndarray | None = None,
    format_penalty: float = 0.0,
) -> np.ndarray:
    """``[B, T]`` float32 rewards: +1 / -1 on the last real token, 0 elsewhere.

    DAPO's soft overlong penalty (``overlong_buffer`` > 0): responses longer than
    ``max_length - overlong_buffer`` lose up to ``overlong_penalty`` linearly, reaching it at
    ``max_length``. ``format_penalty`` is subtracted where ``has_answer`` is False (no answer
    could be extracted). Rows with no response tokens get no reward.
    """
    mask = np.asarray(response_mask) > 0
    lengths = mask.sum(axis=1)
    score = np.where(np.asarray(correct), correct_reward, incorrect_reward).astype(np.float32)
    if overlong_buffer > 0:
        if max_length is None:
            raise ValueError("overlong_buffer needs max_length")
        start = max_length - overlong_buffer
        over = np.clip((lengths - start) / overlong_buffer, 0.0, 1.0)
        score = score - overlong_penalty * over.astype(np.float32)
    if format_penalty and has_answer is not None:
        score = score - format_penalty * (~np.asarray(has_answer, bool)).astype(np.float32)
    rewards = np.zeros(mask.shape, np.float32)
    rows = np.nonzero(lengths > 0)[0]
    rewards[rows, lengths[rows] - 1] = score[rows]
    return rewards
