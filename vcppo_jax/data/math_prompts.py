"""Real math prompt sets (AIME, MATH, DAPO-style): local JSONL or Parquet rows ``{problem,
answer}`` -> a TFDS dataset in ``array_record`` files, read back by random access.

    builder = build_dataset(["aime24.jsonl"], data_dir="/data/tfds")
    source = builder.as_data_source(split="train")      # no TensorFlow needed
    it = PromptIterator(len(source), batch_size=64, seed=0)
    rows = [decode_row(source[i]) for i in it.next_indices()]
    it.state()   # {"seed", "epoch", "index"}: saved in checkpoints, restored with from_state

A malformed row stops the build with an error naming the file and line (or row number).
Field names other than ``problem`` / ``answer`` can be mapped (``question`` -> ``problem``,
``solution`` -> ``answer`` are recognised).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

PROBLEM_KEYS = ("problem", "question", "prompt")
ANSWER_KEYS = ("answer", "solution", "final_answer", "ground_truth")


class DataError(ValueError):
    """A prompt file, row or prompt set that cannot be used."""

    pass


def _pick(row: dict, keys: Sequence[str], where: str, what: str) -> str:
    for k in keys:
        if k in row and row[k] is not None:
            value = row[k]
            if isinstance(value, (int, float)):
                value = str(value)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field {k!r} must be a non-empty string; got {value!r}")
            return value
    raise DataError(f"{where}: no {what} field (expected one of {list(keys)}); got {list(row)}")


def read_rows(path: str) -> Iterator[dict[str, str]]:
    """Yields {"problem", "answer"} from a .jsonl or .parquet file, with file/line errors."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a prompt file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith((".jsonl", ".json")):
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    yield _json_row(line, f"{path}:{lineno}")
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror})") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start} of a line)") from e
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file.
            raise DataError(f"{path}: not a readable Parquet file ({e})") from e
        for i, row in enumerate(table.to_pylist()):
            where = f"{path}: row {i}"
            yield {
                "problem": _pick(row, PROBLEM_KEYS, where, "problem"),
                "answer": _pick(row, ANSWER_KEYS, where, "answer"),
            }
    else:
        raise DataError(f"{path}: expected a .jsonl or .parquet file")


def _json_row(line: str, where: str) -> dict[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return {
        "problem": _pick(row, PROBLEM_KEYS, where, "problem"),
        "answer": _pick(row, ANSWER_KEYS, where, "answer"),
    }


def check_files(source_files: Sequence[str]) -> dict[str, int]:
    """Reads every row of every file (a prompt set is small) so that a bad file is reported
    naming it before any dataset is built. -> rows per file; an empty file is an error."""
    counts = {}
    for path in source_files:
        counts[path] = sum(1 for _ in read_rows(path))
        if counts[path] == 0:
            raise DataError(f"{path}: holds no rows (the file is empty)")
    return counts


class MathPrompts(tfds.core.GeneratorBasedBuilder):
    """Problems with reference answers, from local files."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, source_files: Sequence[str], **kwargs):
        self._source_files = [os.path.abspath(f) for f in source_files]
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Math problems with reference answers (local JSONL / Parquet).",
            features=tfds.features.FeaturesDict(
                {"problem": tfds.features.Text(), "answer": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for path in self._source_files:
            for i, row in enumerate(read_rows(path)):
                yield f"{os.path.basename(path)}:{i}", row


def build_dataset(source_files: Sequence[str], data_dir: str, name: str | None = None):
    """Builds (once) and returns the builder. The dataset's name and version folder depend on
    the source files' contents, so changed files give a new dataset rather than a stale one."""
    check_files(source_files)
    digest = hashlib.sha1()
    for path in source_files:
        with open(path, "rb") as f:
            digest.update(f.read())
    config_name = name or f"src_{digest.hexdigest()[:12]}"
    builder = MathPrompts(source_files=source_files, data_dir=os.path.join(data_dir, config_name))
    builder.download_and_prepare(file_format="array_record")
    return builder


def decode_row(example: dict) -> dict[str, str]:
    """A stored example as ``{"problem", "answer"}`` strings (bytes decoded as UTF-8)."""
    out = {}
    for k in ("problem", "answer"):
        v = example[k]
        out[k] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return out


class PromptIterator:
    """Deterministic shuffled batches by index arithmetic: epoch e visits
    ``permutation(seed, e)``. The position (seed, epoch, index) is the whole state."""

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        if size < 1:
            raise DataError("the prompt set is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.index = epoch, index

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next_indices(self) -> list[int]:
        """The next ``batch_size`` row indices, running on into the next epoch's permutation when
        this one ends; advances the position."""
        out = []
        while len(out) < self.batch_size:
            perm = self._perm(self.epoch)
            take = min(self.batch_size - len(out), self.size - self.index)
            out += perm[self.index : self.index + take].tolist()
            self.index += take
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        """The position ``{"seed", "epoch", "index"}``: what ``from_state`` restores."""
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    @classmethod
    def from_state(cls, size: int, batch_size: int, state: dict[str, int]) -> PromptIterator:
        """An iterator over ``size`` rows resumed at a position saved by ``state``."""
        return cls(size, batch_size, state["seed"], state["epoch"], state["index"])
