"""Where an experiment's prompts, tokenizer and answer checking come from.

* ``SyntheticSource``: the multi-term addition task; its SentencePiece tokenizer is trained on
  the task corpus in the workdir; answers are checked exactly; problems are a function of the
  (seed, stage, step) random stream, so it has no state to save.
* ``MathSource``: a real prompt set (JSONL / Parquet built into a TFDS array_record dataset),
  the tokenizer of the pretrained model (``tokenizer.json``), answers checked by math-verify in
  a worker pool with a timeout; its iterator position (seed, epoch, index) is saved in every
  checkpoint and restored on resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from vcppo_jax import rewards
from vcppo_jax.data import math_prompts
from vcppo_jax.data.synthetic import AdditionTask
from vcppo_jax.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_sentencepiece

EVAL_SEED_OFFSET = 1_000_003  # Held-out problems and sampling use a disjoint seed stream.


@dataclasses.dataclass(frozen=True)
class MathProblem:
    """A problem of a real prompt set: its prompt text and reference answer."""

    prompt: str
    answer: str


class SyntheticSource:
    """The addition task: a SentencePiece tokenizer trained once per workdir (by process 0),
    exact answer checking, and no state."""

    def __init__(self, task: AdditionTask, workdir: str, seed: int, vocab_size: int):
        self.task = task
        self.seed = seed
        path = os.path.join(workdir, "tokenizer", "spm.model")
        # What the tokenizer is trained from: a workdir's tokenizer serves only these settings.
        settings = {"task": dataclasses.asdict(task), "seed": seed, "vocab_size": vocab_size}
        settings_path = os.path.join(os.path.dirname(path), "settings.json")
        if os.path.exists(path) and os.path.exists(settings_path):
            with open(settings_path) as f:
                made = json.load(f)
            if made != settings:
                differ = sorted(
                    f"{k}: {made.get(k)!r} there, {settings[k]!r} here"
                    for k in settings
                    if made.get(k) != settings[k]
                )
                raise TokenizerError(
                    f"{path} was trained for other task settings ({'; '.join(differ)}); it "
                    "belongs to the run in that workdir: use a new --workdir"
                )
        if not os.path.exists(path) and jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            prefix = os.path.join(os.path.dirname(path), f"tmp{os.getpid()}")
            train_sentencepiece(
                task.corpus(2000, seed),
                prefix,
                vocab_size,
                user_defined_symbols=["Answer:", "Add:"],
            )
            with open(prefix + ".json", "w") as f:
                json.dump(settings, f, indent=2, sort_keys=True)
            os.replace(prefix + ".json", settings_path)
            os.replace(prefix + ".vocab", path[: -len(".model")] + ".vocab")
            os.replace(prefix + ".model", path)  # Last: the tokenizer is there once this is.
        if jax.process_count() > 1:  # The others wait for process 0's tokenizer.
            multihost_utils.sync_global_devices("tokenizer")
        # Prompts end with "=": the response starts right after it.
        self.tokenizer: Tokenizer = load_tokenizer(path, prompt_template="{prompt}", add_bos=True)

    def train_problems(self, n: int, rng: np.random.Generator):
        """``n`` fresh training problems, seeded from ``rng``."""
        return self.task.problems(n, int(rng.integers(2**31)))

    def eval_problems(self, n: int):
        """``n`` held-out problems, the same on every call (seed ``seed + EVAL_SEED_OFFSET``)."""
        return self.task.problems(n, self.seed + EVAL_SEED_OFFSET)

    def check(self, texts, problems) -> tuple[np.ndarray, dict]:
        """Exact-match correctness ``[B]`` (bool) of each response against its problem's answer, and
        no metrics."""
        correct = [rewards.exact_match(t, p.answer) for t, p in zip(texts, problems, strict=True)]
        return np.array(correct, bool), {}

    def state(self) -> dict:
        """Empty: problems follow the (seed, stage, step) random stream, so nothing is saved."""
        return {}

    def restore(self, state: dict) -> None:
        """Nothing to restore: ``state`` is always empty."""
        del state

    def close(self) -> None:
        """Nothing to release."""
        pass


class MathSource:
    """A real prompt set: the TFDS dataset built from ``train_files``, the pretrained model's
    tokenizer, and math-verify in a pool of worker processes."""

    def __init__(
        self,
        *,
        train_files,
        eval_files,
        tfds_dir,
        tokenizer_path,
        prompt_template,
        batch_size: int,
        seed: int,
        verifier_workers: int,
        verifier_timeout_s: float,
    ):
        if not train_files:
            raise math_prompts.DataError("data.train_files: no files given for data.task='math'")
        math_prompts.check_files(eval_files)  # The training files are checked by the build.
        self.builder = math_prompts.build_dataset(train_files, tfds_dir)
        self.data = self.builder.as_data_source(split="train")
        self.iterator = math_prompts.PromptIterator(len(self.data), batch_size, seed)
        self.eval_rows = [r for f in (eval_files or train_files) for r in math_prompts.read_rows(f)]
        self.tokenizer = load_tokenizer(
            tokenizer_path, prompt_template=prompt_template, add_bos=False
        )
        self.verifier = rewards.MathVerifier(verifier_workers, verifier_timeout_s)
        print(
            f"math prompts: {len(self.data)} training, {len(self.eval_rows)} evaluation",
            file=sys.stderr,
            flush=True,
        )

    def train_problems(self, n: int, rng: np.random.Generator):
        """The next ``n`` problems from the checkpointed iterator (``rng`` is unused); a new ``n``
        becomes the iterator's batch size."""
        del rng  # The order comes from the iterator, whose position is checkpointed.
        if n != self.iterator.batch_size:
            self.iterator.batch_size = n
        rows = [math_prompts.decode_row(self.data[i]) for i in self.iterator.next_indices()]
        return [MathProblem(r["problem"], r["answer"]) for r in rows]

    def eval_problems(self, n: int):
        """The first ``n`` rows of ``eval_files`` (of ``train_files`` when none are given)."""
        return [MathProblem(r["problem"], r["answer"]) for r in self.eval_rows[:n]]

    def check(self, texts, problems) -> tuple[np.ndarray, dict]:
        """math-verify correctness ``[B]`` (bool) of each response, and the verifier's timeout and
        error counts as metrics."""
        res = self.verifier(list(texts), [p.answer for p in problems])
        return res.correct, {
            "reward/verifier_timeouts": res.timeouts,
            "reward/verifier_errors": res.errors,
        }

    def state(self) -> dict:
        """The prompt iterator's position (seed, epoch, index), saved in every checkpoint."""
        return self.iterator.state()

    def restore(self, state: dict) -> None:
        """Resumes the prompt iterator at a saved position; an empty ``state`` keeps the
        current one."""
        if state:
            self.iterator = math_prompts.PromptIterator.from_state(
                self.iterator.size, self.iterator.batch_size, state
            )

    def close(self) -> None:
        """Shuts down the verifier's worker pool."""
        self.verifier.close()
