"""Metrics: one JSON object per logged step in ``metrics.jsonl`` (what the plots read), the same
scalars as TensorBoard events, and a progress line per step."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np


def _scalar(v: Any):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    try:
        f = float(np.asarray(v))
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else str(f)


class MetricsWriter:
    """Appends metric rows to ``workdir/metrics.jsonl`` and, optionally, TensorBoard; only
    process 0 writes."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, process_index: int = 0):
        self.enabled = process_index == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """Logs ``metrics`` at ``step`` of ``stage`` as one row (values as JSON scalars, non-finite
        ones as strings) and returns the row; float values also go to TensorBoard as
        ``stage/key``."""
        row = {"step": int(step), "stage": stage, "time": time.time()}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        if self.enabled:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
            if self._tb is not None:
                for k, v in row.items():
                    if k not in ("step", "stage", "time") and isinstance(v, float):
                        self._tb.add_scalar(f"{stage}/{k}", v, step)
        return row

    def rewrite(self, lines: list[str]) -> None:
        """Replaces the file's rows (used when resuming), atomically."""
        self._file.close()
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def trim_to(self, stages: list[str], stage_index: int, stage_step: int) -> None:
        """Keeps only the rows of a run resumed at step ``stage_step`` of ``stages[stage_index]``
        (the rows after it will be written again): a stage row at step s is done once s + 1
        steps are; an evaluation row at step s comes before PPO step s."""
        if not self.enabled or not os.path.exists(self.path):
            return
        resume = (stage_index, stage_step)
        kept = []
        for line, row in _rows(self.path):
            stage = "ppo" if row["stage"] == "eval" else row["stage"]
            if stage not in stages:
                continue
            done = row["step"] + (0.5 if row["stage"] == "eval" else 1)
            if (stages.index(stage), done) <= resume:
                kept.append(line)
        self.rewrite(kept)

    def close(self):
        """Closes the metrics file and the TensorBoard writer."""
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


class MetricsFileError(ValueError):
    """A metrics file with a line that is not a JSON row (other than a torn last line)."""


def _rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of each line of a metrics file. A torn last line (a run killed while
    writing it) is dropped with a warning; a bad line elsewhere is an error naming it."""
    with open(path) as f:
        lines = f.readlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append((line if line.endswith("\n") else line + "\n", json.loads(line)))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                print(f"warning: {path}: dropping a torn last line ({e})", file=sys.stderr)
                continue
            raise MetricsFileError(f"{path}, line {i + 1}: not a JSON row ({e})") from e
    return out


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Every row of a ``metrics.jsonl`` file (or of a workdir's), in order."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    return [row for _, row in _rows(path)]


class Progress:
    """``[stage] step 12/60 | k=v ... | 3.1 s/step | ETA 2m30s`` on stderr."""

    def __init__(self, stage: str, total: int, start: int = 0, every: int = 1):
        self.stage, self.total, self.every = stage, total, every
        self.t0, self.start = time.time(), start

    def update(self, step: int, metrics: dict[str, Any], keys: tuple[str, ...]) -> None:
        """Prints the line for ``step`` (0-based) every ``every`` steps and at the last one, showing
        those of ``keys`` present in ``metrics``."""
        done = step + 1
        if done % self.every and done != self.total:
            return
        per = (time.time() - self.t0) / max(done - self.start, 1)
        eta = per * (self.total - done)
        shown = " ".join(
            f"{k.split('/')[-1]}={float(metrics[k]):.4g}" for k in keys if k in metrics
        )
        print(
            f"[{self.stage}] step {done}/{self.total} | {shown} | {per:.2f} s/step | "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s",
            file=sys.stderr,
            flush=True,
        )


POSITION_PROFILE = "position_profile.json"


def position_profile(values, advantages, returns, mask) -> dict:
    """Mean value, advantage and Monte Carlo return by response position (host arrays
    ``[B, T]``; None where no response reaches a position): the paper's
    value-initialisation-bias picture, value minus return being the bias."""
    m = np.asarray(mask)
    count = m.sum(0)
    mean = lambda x: [
        float(v / n) if n else None for v, n in zip((np.asarray(x) * m).sum(0), count, strict=True)
    ]
    return {
        "count": [float(n) for n in count],
        "value": mean(values),
        "advantage": mean(advantages),
        "return": mean(returns),
    }


def write_profile(workdir: str, profile: dict) -> None:
    """Writes a run's position profile (what ``load_profile`` reads)."""
    with open(os.path.join(workdir, POSITION_PROFILE), "w") as f:
        json.dump(profile, f)


def load_profile(path: str) -> dict | None:
    """The run's position_profile.json (value / advantage by position), if it has one."""
    wd = path if os.path.isdir(path) else os.path.dirname(path)
    prof = os.path.join(wd, POSITION_PROFILE)
    if not os.path.exists(prof):
        return None
    with open(prof) as f:
        out = json.load(f)
    if "return" in out:  # The critic's bias: value minus the Monte Carlo return.
        out["value_minus_return"] = [
            None if v is None or r is None else v - r
            for v, r in zip(out["value"], out["return"], strict=True)
        ]
    return out
