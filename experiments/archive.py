"""Finished runs kept in the repository, so a long study can be built up over several sessions.

A workdir holds checkpoints and event files (megabytes); what the study's tables and figures are
drawn from is small: ``metrics.jsonl``, ``config.json``, ``position_profile.json``, the ``DONE``
marker and, for an SFT run, its ``sft_policy`` export (the tiny model's weights and tokenizer,
about a megabyte), which every method of that seed starts from. ``save`` copies those files of a
finished run into an archive folder (e.g. ``docs/results/study_long``, committed); ``restore``
puts them back into an empty workdir, which the drivers then treat as finished. Both drivers
take ``--archive DIR``: finished runs found there are not run again, and each run is archived as
soon as it finishes. Given the config the run would have now (``wanted``), ``restore`` refuses
an archived run whose ``config.json`` differs from it (``ArchiveMismatch``, naming the fields),
so a changed default or flag never silently reuses a run made under other settings.
"""

from __future__ import annotations

import json
import os
import shutil

RUN_FILES = ("DONE", "metrics.jsonl", "config.json", "position_profile.json")
RUN_DIRS = ("sft_policy",)

# Fields that say where a run's inputs were or what "auto" stood for, not what the run was:
# not compared (the SFT policy a run starts from is an archived run of its own, checked itself).
NOT_COMPARED = ("sft.init_from", "resolved")


class ArchiveMismatch(RuntimeError):
    """An archived run was made under a config that differs from the run asked for now."""


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(archived: dict, wanted: dict) -> list[str]:
    """One line per field set in both configs to different values. A field only one of them
    has (added to the project after the run, or since removed) is not compared."""
    old, new = _flat(archived), _flat(wanted)
    lines = []
    for k in sorted(set(old) & set(new)):
        if any(k == f or k.startswith(f + ".") for f in NOT_COMPARED):
            continue
        a, b = old[k], new[k]
        if isinstance(a, list) or isinstance(b, (list, tuple)):  # JSON has no tuples.
            a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
        if a != b:
            lines.append(f"{k}: archived {a!r}, asked for {b!r}")
    return lines


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


def restore(archived: str, workdir: str, wanted: dict | None = None) -> bool:
    """Put an archived finished run into ``workdir`` when the workdir has not finished it.

    Returns True when the run is (now) finished in ``workdir``. A workdir that holds a started
    but unfinished run is left alone (it resumes from its own checkpoints) unless the archive
    has the finished run, which then replaces the run's small files (the checkpoints stay).
    With ``wanted`` (the config the run would have now), an archived run made under another
    config raises ``ArchiveMismatch`` and nothing is copied."""
    if _finished(workdir):
        return True
    if not _finished(archived):
        return False
    if wanted is not None:
        try:
            with open(os.path.join(archived, "config.json")) as f:
                made = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ArchiveMismatch(f"{archived}: its config.json cannot be read ({e})") from e
        diff = config_differences(made, wanted)
        if diff:
            raise ArchiveMismatch(
                f"{archived} was made under another config ({len(diff)} field(s)):\n  "
                + "\n  ".join(diff)
                + "\nUse another --archive folder, or remove that run from the archive to run "
                "it again."
            )
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
