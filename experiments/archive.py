"""Finished runs kept in the repository, so a long study can be built up over several sessions.

A workdir holds checkpoints and event files (megabytes); what the study's tables and figures are
drawn from is small: ``metrics.jsonl``, ``config.json``, ``position_profile.json``, the ``DONE``
marker and, for an SFT run, its ``sft_policy`` export (the tiny model's weights and tokenizer,
about a megabyte), which every method of that seed starts from. ``save`` copies those files of a
finished run into an archive folder (e.g. ``docs/results/study_long``, committed); ``restore``
puts them back into an empty workdir, which the drivers then treat as finished. Both drivers
take ``--archive DIR``: finished runs found there are not run again, and each run is archived as
soon as it finishes.
"""

from __future__ import annotations

import os
import shutil

RUN_FILES = ("DONE", "metrics.jsonl", "config.json", "position_profile.json")
RUN_DIRS = ("sft_policy",)


def _finished(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "DONE")) and os.path.isfile(
        os.path.join(path, "metrics.jsonl")
    )


def save(workdir: str, archived: str) -> None:
    """Copy a finished run's small files into ``archived`` (replacing an older copy)."""
    if not _finished(workdir):
        raise FileNotFoundError(f"{workdir}: not a finished run (no DONE or metrics.jsonl)")
    tmp = archived.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in RUN_FILES:
        if os.path.isfile(src := os.path.join(workdir, name)):
            shutil.copy2(src, os.path.join(tmp, name))
    for name in RUN_DIRS:
        if os.path.isdir(src := os.path.join(workdir, name)):
            shutil.copytree(src, os.path.join(tmp, name))
    shutil.rmtree(archived, ignore_errors=True)
    os.replace(tmp, archived)  # Never a half-copied archive entry.


def restore(archived: str, workdir: str) -> bool:
    """Put an archived finished run into ``workdir`` when the workdir has not finished it.

    Returns True when the run is (now) finished in ``workdir``. A workdir that holds a started
    but unfinished run is left alone (it resumes from its own checkpoints) unless the archive
    has the finished run, which then replaces the run's small files (the checkpoints stay)."""
    if _finished(workdir):
        return True
    if not _finished(archived):
        return False
    os.makedirs(workdir, exist_ok=True)
    for name in RUN_DIRS:
        if os.path.isdir(src := os.path.join(archived, name)):
            shutil.rmtree(dst := os.path.join(workdir, name), ignore_errors=True)
            shutil.copytree(src, dst)
    # DONE last: a restore interrupted part-way does not look finished.
    for name in (*[n for n in RUN_FILES if n != "DONE"], "DONE"):
        if os.path.isfile(src := os.path.join(archived, name)):
            shutil.copy2(src, os.path.join(workdir, name))
    return True
