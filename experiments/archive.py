"""Finished runs kept in the repository, so a long study can be built up over several sessions.

A workdir holds checkpoints and event files (megabytes); what the study's tables and figures are
drawn from is small: ``metrics.jsonl``, ``config.json`` (with the host it ran on),
``resumes.jsonl``, ``position_profile.json``, the ``DONE`` marker and, for an SFT run, its
``sft_policy`` export (the tiny model's weights and tokenizer, about a megabyte), which every
method of that seed starts from, and for a reward-model run its ``reward_model_export`` (as
small), which every method of that seed needing one reads.
``save`` copies those files of a finished run into an archive folder (e.g.
``docs/results/study_long``, committed); ``restore`` puts them back into an empty workdir, which
the drivers then treat as finished. Both drivers take ``--archive DIR``: finished runs found
there are not run again, and each run is archived as soon as it finishes. Given the config the
run would have now (``wanted``), ``restore`` refuses an archived run whose ``config.json``
differs from it (``ArchiveMismatch``, naming the fields), so a changed default or flag never
silently reuses a run made under other settings.
"""

from __future__ import annotations

import json
import os
import shutil

RUN_FILES = ("DONE", "metrics.jsonl", "config.json", "position_profile.json", "resumes.jsonl")
RUN_DIRS = ("sft_policy", "reward_model_export")

# Fields that say where a run's inputs were or what "auto" stood for, not what the run was:
# not compared (the SFT policy and the reward model a run starts from are archived runs of
# their own, checked themselves; a shared reward model is the one the run would have trained).
NOT_COMPARED = ("sft.init_from", "reward_model.init_from", "resolved")


# Fields added to the project whose default differs from what runs made before them did: an
# archived config without the field was made at this value, and is compared as such.
ADDED_FIELDS = {"model.mask_unused_vocab": False}


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


def stages_of(config: dict) -> list[str] | None:
    """The stages a run of this (JSON) config goes through, or None where it is too old or
    too partial to tell."""
    import ml_collections

    from vcppo_jax.runner import planned_stages

    try:
        return planned_stages(
            ml_collections.ConfigDict({k: v for k, v in config.items() if k != "resolved"})
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def unread_fields(config: dict) -> tuple[str, ...]:
    """Config groups that no stage of this run reads: a reward model's or value pretraining's
    fields where that stage does not run, and with ``ppo.steps == 0`` (an SFT-only run, as
    the study trains each seed's policy) PPO's, the actor's, GAE's and, without value
    pretraining, the critic's. Where the two configs plan the same stages these are not
    compared, so a later change to, say, ``value_pretrain.init`` still reuses an archived SFT
    policy."""
    stages = stages_of(config)
    if stages is None:
        return ()
    unread = [s for s in ("reward_model", "value_pretrain") if s not in stages]
    if config.get("ppo", {}).get("steps") == 0:
        unread += ["ppo", "actor", "gae", "advantage"]
        if "value_pretrain" not in stages:
            unread.append("critic")
    return tuple(unread)


def placement_rules(rules) -> dict:
    """Logical-axis rules as what they place: each logical name's mesh axes (the first rule for
    a name, as Flax reads the table), names left replicated dropped, since a name no rule
    matches is replicated too. Two tables that place every name alike compare equal, e.g. one
    with a rule added as ``(name, None)`` (``activation_embed``) and one from before it."""
    from vcppo_jax.sharding import rule_axes

    names = dict.fromkeys(name for name, _ in rules)
    return {n: list(axes) for n in names if (axes := rule_axes(n, rules))}


# Fields compared by what they mean rather than as written.
CANONICAL = {"mesh.rules": placement_rules}


def config_differences(archived: dict, wanted: dict) -> list[str]:
    """One line per field set in both configs to different values. A field only one of them
    has (added to the project after the run, or since removed) is not compared, except one of
    ``ADDED_FIELDS``, which an archived config lacking it ran at its listed value; nor are the
    fields no stage of the run reads (``unread_fields``) when both configs plan the same
    stages and agree on ``ppo.steps``; where the stages differ, that is the first line."""
    old, new = _flat(archived), _flat(wanted)
    old = {**{k: v for k, v in ADDED_FIELDS.items() if k in new}, **old}
    lines = []
    skip = NOT_COMPARED
    a_stages, w_stages = stages_of(archived), stages_of(wanted)
    if a_stages != w_stages:
        lines.append(f"stages: archived {a_stages!r}, asked for {w_stages!r}")
    elif old.get("ppo.steps") == new.get("ppo.steps"):
        skip = NOT_COMPARED + unread_fields(archived)
    for k in sorted(set(old) & set(new)):
        if any(k == f or k.startswith(f + ".") for f in skip):
            continue
        a, b = old[k], new[k]
        if isinstance(a, list) or isinstance(b, (list, tuple)):  # JSON has no tuples.
            a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
        if k in CANONICAL and CANONICAL[k](a) == CANONICAL[k](b):
            continue
        if a != b:
            lines.append(f"{k}: archived {a!r}, asked for {b!r}")
    return lines


def _finished(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "DONE")) and os.path.isfile(
        os.path.join(path, "metrics.jsonl")
    )


def _kept_dirs(workdir: str) -> tuple[str, ...]:
    """The ``RUN_DIRS`` an archived run keeps: a reward model's export only from a run that
    stops before PPO (as the study's per-seed reward-model runs do); a method run that trained
    its own keeps its rows in metrics.jsonl, not the weights (a collapse-map grid would
    otherwise commit a model per cell)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            ppo_steps = json.load(f).get("ppo", {}).get("steps")
    except (OSError, json.JSONDecodeError):
        ppo_steps = None
    return tuple(d for d in RUN_DIRS if d != "reward_model_export" or ppo_steps == 0)


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
    for name in _kept_dirs(workdir):
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
