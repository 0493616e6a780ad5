"""Answer extraction and verification -> a terminal reward on the last response token.

Extraction tries, in order: the last ``\\boxed{...}``, the last ``Answer: ...`` line, the last
number. Verification is exact (after normalising whitespace and numbers) for the synthetic tasks,
and ``math-verify`` for LaTeX answers, run in a process pool with a per-answer timeout: a
verifier that hangs or crashes scores as incorrect and is counted.

The timeout is each answer's own: its clock starts when a worker starts that answer (a
watchdog thread in the worker sends ``SIGALRM`` to the verifying thread when the answer's time
is up, and again every ``KICK_INTERVAL_S`` until the answer ends), so answers queued behind slow
ones are never charged for the wait, and identical input gives identical counts. math-verify is
called with its own ``SIGALRM`` timeouts off, and a verifier that sets or cancels ``SIGALRM``
timers or handlers of its own cannot stop the watchdog; an answer that returns after its time
is counted as a timeout whatever it returned. A worker stuck where the signal cannot reach it
(inside C code) is caught by a batch deadline on the caller's side, which allows every answer
its full timeout: ``ceil(B / workers)`` rounds of ``timeout_s`` plus ``BATCH_SLACK_S``.

A verifier that kills its worker process (``os._exit``, a segfault) breaks the pool. The pool is
replaced and the answers left unfinished are verified again; those that were in progress when
it broke run one at a time, so that an answer which kills its worker once more is the one
scored as an error, and every other answer keeps its own outcome.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import math
import multiprocessing
import re
import signal
import threading
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

    # math-verify's own timeouts arm and then cancel SIGALRM timers of their own; off, the
    # answer's own timeout (``_timed_verify``) is the only one.
    gold_expr = gold if "\\boxed" in gold or "$" in gold else f"\\boxed{{{gold}}}"
    return bool(
        verify(
            parse(gold_expr, parsing_timeout=None),
            parse(pred_text, parsing_timeout=None),
            timeout_seconds=None,
        )
    )


class _NoTimeoutNotice(logging.Filter):
    """Drops math-verify's notice that its own timeouts are off: ``_timed_verify`` times each
    answer instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


# In a worker: which answer each worker is verifying (-1: none), shared with the caller, and
# this worker's slot in it.
_RUNNING = None
_SLOT = 0


def _start_verifier_worker(barrier, load_math_verify: bool, verify_fn, running) -> None:
    """Pool initializer: import math-verify (seconds on a busy machine) and wait until every
    worker has, so that start-up never counts against an answer's timeout. ``verify_fn``
    arrives pickled by reference: receiving it has imported its module here already.
    ``running`` holds one slot per worker; the barrier gives each worker its own."""
    global _RUNNING, _SLOT
    del verify_fn
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_NoTimeoutNotice())
    if load_math_verify:
        try:
            import math_verify  # noqa: F401
        except ImportError:  # Each answer then fails alone and is counted as an error.
            pass
    _RUNNING = running
    _SLOT = barrier.wait()


def _ready() -> bool:
    return True


STARTUP_TIMEOUT_S = 300.0
BATCH_SLACK_S = 10.0  # Beyond the batch's rounds of timeouts: process and pickling overhead.
KICK_INTERVAL_S = 0.05  # Between the watchdog's signals once an answer's time is up.


class _AnswerTimeout(BaseException):
    """Raised in a worker when one answer's own time runs out. Not an ``Exception``, so that a
    verifier's ``except Exception`` (math-verify has many) does not swallow it."""


def _on_alarm(signum, frame):
    raise _AnswerTimeout


def _watchdog(thread_id: int, timeout_s: float, finished: threading.Event) -> None:
    """Signals ``thread_id`` when ``timeout_s`` has passed, then again every ``KICK_INTERVAL_S``
    until ``finished``: one signal may land in a verifier's own handler, or be swallowed."""
    if finished.wait(timeout_s):
        return
    while not finished.is_set():
        signal.pthread_kill(thread_id, signal.SIGALRM)
        finished.wait(KICK_INTERVAL_S)


def _timed_verify(verify_fn, timeout_s: float, index: int, text: str, gold: str) -> str:
    """In a worker: ``verify_fn(text, gold)`` (answer ``index`` of its batch) with a clock that
    starts now. -> "correct", "wrong", "timeout" (its time ran out, whatever it returned) or
    "error" (the verifier raised)."""
    if _RUNNING is not None:
        _RUNNING[_SLOT] = index
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    finished = threading.Event()
    timer = threading.Thread(
        target=_watchdog, args=(threading.get_ident(), timeout_s, finished), daemon=True
    )
    start = time.monotonic()
    outcome = "timeout"
    try:
        try:
            timer.start()
            outcome = "correct" if verify_fn(text, gold) else "wrong"
        except _AnswerTimeout:
            pass
        except BaseException:  # SystemExit too: it would otherwise reach the caller.
            outcome = "error"
        elapsed = time.monotonic() - start
    except _AnswerTimeout:  # Landed in a handler above: the outcome stands.
        elapsed = time.monotonic() - start
    while True:  # A signal sent just before the watchdog stopped may land here: again.
        try:
            finished.set()
            timer.join()
            signal.setitimer(signal.ITIMER_REAL, 0)  # A timer the verifier left running.
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # Delivers any signal held.
            signal.signal(signal.SIGALRM, previous)
            break
        except _AnswerTimeout:
            pass
    if _RUNNING is not None:
        _RUNNING[_SLOT] = -1
    return "timeout" if elapsed > timeout_s else outcome


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
        self._running = None  # The pool's workers' answers in progress (-1: none).

    def _get_pool(self):
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            running = ctx.Array("q", [-1] * self.workers, lock=False)
            pool = cf.ProcessPoolExecutor(
                self.workers,
                mp_context=ctx,
                initializer=_start_verifier_worker,
                initargs=(
                    ctx.Barrier(self.workers),
                    self.verify_fn is _math_verify_one,
                    self.verify_fn,
                    running,
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
            self._pool, self._running = pool, running
        return self._pool

    def _reset(self):
        if self._pool is not None:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                p.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._running = None

    def _run(self, indices, texts, golds, outcomes) -> set[int] | None:
        """Verifies answers ``indices`` on the pool, writing each finished one's outcome into
        ``outcomes``. -> None, or where a worker process died, the answers in progress then
        (the others of ``indices`` without an outcome never started, or finished unreported);
        the pool is then replaced, as it is after a hang."""
        pool = self._get_pool()
        running = self._running
        futures = {
            i: pool.submit(_timed_verify, self.verify_fn, self.timeout_s, i, texts[i], golds[i])
            for i in indices
        }
        rounds = math.ceil(len(indices) / self.workers)
        deadline = time.monotonic() + rounds * self.timeout_s + BATCH_SLACK_S
        hung = broken = False
        for i, fut in futures.items():
            try:
                outcomes[i] = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except cf.TimeoutError:  # Stuck beyond the signal's reach (in C code).
                outcomes[i], hung = "timeout", True
            except cf.process.BrokenProcessPool:  # A worker process died: no outcome yet.
                broken = True
            except _AnswerTimeout:  # The answer's time ran out as it ended.
                outcomes[i] = "timeout"
            except Exception:  # The answer could not be sent or its outcome returned.
                outcomes[i] = "error"
        in_progress = {int(i) for i in running if i >= 0} if broken else None
        if hung or broken:  # A stuck or broken pool would fail later calls: start a fresh one.
            self._reset()
        return in_progress

    def __call__(self, texts: list[str], golds: list[str]) -> VerifyResult:
        if len(texts) != len(golds):
            raise ValueError(f"{len(texts)} answers for {len(golds)} gold answers")
        outcomes: list[str | None] = [None] * len(texts)
        todo = list(range(len(texts)))
        while todo:
            in_progress = self._run(todo, texts, golds, outcomes)
            if in_progress is None:
                break
            todo = [i for i in todo if outcomes[i] is None]
            # One at a time, those in progress when the pool broke (all left, where none was):
            # an answer that breaks a pool on its own is the one that kills its worker.
            suspects = [i for i in todo if i in in_progress] or todo
            for i in suspects:
                if self._run([i], texts, golds, outcomes) is not None:
                    outcomes[i] = "error"
            todo = [i for i in todo if outcomes[i] is None]  # Fewer each time round.
        correct = np.array([o == "correct" for o in outcomes], bool)
        timeouts = sum(o == "timeout" for o in outcomes)
        errors = sum(o == "error" for o in outcomes)
        return VerifyResult(correct, timeouts, errors)

    def close(self):
        """Shuts the worker pool down, waiting for it; a later call starts a new one."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = self._running = None


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
