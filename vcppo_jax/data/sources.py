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
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from vcppo_jax import rewards
from vcppo_jax.data import math_prompts
from vcppo_jax.data.synthetic import AdditionTask
from vcppo_jax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

EVAL_SEED_OFFSET = 1_000_003  # Held-out problems and sampling use a disjoint seed stream.


@dataclasses.dataclass(frozen=True)
class MathProblem:
    prompt: str
    answer: str


class SyntheticSource:
    def __init__(self, task: AdditionTask, workdir: str, seed: int, vocab_size: int):
        self.task = task
        self.seed = seed
        path = os.path.join(workdir, "tokenizer", "spm.model")
        if not os.path.exists(path) and jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            prefix = os.path.join(os.path.dirname(path), f"tmp{os.getpid()}")
            train_sentencepiece(
                task.corpus(2000, seed),
                prefix,
                vocab_size,
                user_defined_symbols=["Answer:", "Add:"],
            )
            os.replace(prefix + ".model", path)
            os.replace(prefix + ".vocab", path[: -len(".model")] + ".vocab")
        if jax.process_count() > 1:  # The others wait for process 0's tokenizer.
            multihost_utils.sync_global_devices("tokenizer")
        # Prompts end with "=": the response starts right after it.
        self.tokenizer: Tokenizer = load_tokenizer(path, prompt_template="{prompt}", add_bos=True)

    def train_problems(self, n: int, rng: np.random.Generator):
        return self.task.problems(n, int(rng.integers(2**31)))

    def eval_problems(self, n: int):
        return self.task.problems(n, self.seed + EVAL_SEED_OFFSET)

    def check(self, texts, problems) -> tuple[np.ndarray, dict]:
        correct = [rewards.exact_match(t, p.answer) for t, p in zip(texts, problems, strict=True)]
        return np.array(correct, bool), {}

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        del state

    def close(self) -> None:
        pass


class MathSource:
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
        del rng  # The order comes from the iterator, whose position is checkpointed.
        if n != self.iterator.batch_size:
            self.iterator.batch_size = n
        rows = [math_prompts.decode_row(self.data[i]) for i in self.iterator.next_indices()]
        return [MathProblem(r["problem"], r["answer"]) for r in rows]

    def eval_problems(self, n: int):
        return [MathProblem(r["problem"], r["answer"]) for r in self.eval_rows[:n]]

    def check(self, texts, problems) -> tuple[np.ndarray, dict]:
        res = self.verifier(list(texts), [p.answer for p in problems])
        return res.correct, {
            "reward/verifier_timeouts": res.timeouts,
            "reward/verifier_errors": res.errors,
        }

    def state(self) -> dict:
        return self.iterator.state()

    def restore(self, state: dict) -> None:
        if state:
            self.iterator = math_prompts.PromptIterator.from_state(
                self.iterator.size, self.iterator.batch_size, state
            )

    def close(self) -> None:
        self.verifier.close()
