r"""Entry point: ``python -m vcppo_jax.main --config=configs/vcppo.py:tiny --workdir=DIR``.

Every config field can be overridden, e.g. ``--config.gae.lambda_actor=0.99``. The config is
validated before anything runs; ``--validate_only`` prints the resolved config and exits.
Running again on the same ``--workdir`` resumes from its latest checkpoint.

An error the user can act on (bad config, workdir, data file or checkpoint, a full disk) ends
the run with one ``error:`` line and exit status 1 (2 for a bad config); ``--verbosity=1``
shows the traceback as well.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import sys
from concurrent.futures.process import BrokenProcessPool

from absl import app, flags, logging
from ml_collections import config_flags

from vcppo_jax.config_validation import ConfigError, validate_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/vcppo.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
_VALIDATE_ONLY = flags.DEFINE_bool(
    "validate_only", False, "Validate and print the resolved config, then exit."
)


def main(argv: list[str]) -> None:
    """Validates the config (exit status 2 if invalid), prints it, and unless ``--validate_only``
    runs the experiment in ``--workdir``."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
    if not verbose:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
        # A failed save is reported once, in one line, by the checkpointer; Orbax would log
        # each of its background threads' tracebacks as well.
        logging.get_absl_logger().addFilter(_not_from_orbax)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/vcppo.py:tiny")
    try:
        validate_config(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    if _VALIDATE_ONLY.value:
        return
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required to run an experiment")
    from vcppo_jax import runner

    try:
        runner.run(config, _WORKDIR.value)
    except Exception as e:
        message = user_error(e)
        if message is None or verbose:  # A bug, or asked for: the whole traceback.
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def _not_from_orbax(record) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


# OS errors that say what is wrong with the machine or a file named to it, not with the code.
_OS_ERRNOS = (
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT,
)  # fmt: skip


def user_error(e: BaseException) -> str | None:
    """The one-line message for an error a user can act on (a locked, unwritable or misnamed
    workdir, an attention kernel this backend lacks, a bad data file, a damaged or mismatched
    checkpoint, a failed save, a full disk), or None for anything else (a bug: its traceback
    is shown)."""
    from vcppo_jax.checkpoint import (
        CheckpointDamagedError,
        CheckpointMismatchError,
        CheckpointSaveError,
    )
    from vcppo_jax.data.math_prompts import DataError
    from vcppo_jax.metrics import MetricsFileError
    from vcppo_jax.models.attention import BackendError
    from vcppo_jax.models.hf import CheckpointError
    from vcppo_jax.models.safetensors_io import SafetensorsError
    from vcppo_jax.tokenizer import TokenizerError
    from vcppo_jax.workdir import WorkdirError

    known = (
        WorkdirError,
        BackendError,
        DataError,
        CheckpointDamagedError,
        CheckpointMismatchError,
        CheckpointSaveError,
        CheckpointError,  # A Hugging Face checkpoint (model.hf_path) that cannot be read.
        SafetensorsError,
        TokenizerError,
        MetricsFileError,
    )
    if isinstance(e, known):
        return str(e)
    if isinstance(e, FileNotFoundError) and e.errno is None:  # The project's own message.
        return str(e)
    if isinstance(e, OSError) and e.errno in _OS_ERRNOS:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    if isinstance(e, BrokenProcessPool):
        return f"the answer-verifier pool failed to start ({e})"
    return None


def _paths(config, prefix: str = "") -> list[str]:
    out = []
    for k, v in config.items():
        out += _paths(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"]
    return out


def _config_spec(argv: list[str]) -> tuple[str, str, str] | None:
    """``--config=FILE[:ARG]`` as (the flag's value, FILE, ARG), or None without the flag."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    return None if spec is None else (spec, *spec.partition(":")[::2])


def unknown_overrides(argv: list[str]) -> list[str]:
    """One message per ``--config.a.b=...`` flag that names no field of the config file given
    by ``--config=FILE[:ARG]``, with the closest known names."""
    if (given := _config_spec(argv)) is None:
        return []
    _, path, arg = given
    module_spec = importlib.util.spec_from_file_location("_config_file", path)
    if module_spec is None or module_spec.loader is None:
        return []
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    known = _paths(module.get_config(arg or None))
    out = []
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            field = a[len("--config.") : a.index("=")]
            if field not in known and not any(k.startswith(field + ".") for k in known):
                close = difflib.get_close_matches(field, known, n=3, cutoff=0.5)
                hint = f"; closest: {', '.join(close)}" if close else ""
                out.append(f"--config.{field}: no such config field{hint}")
    return out


def _config_file_problem(argv: list[str]) -> str | None:
    """``--config=FILE[:ARG]`` naming no file: the one-line problem; else None."""
    if (given := _config_spec(argv)) is None or os.path.isfile(given[1]):
        return None
    spec, path, _ = given
    return f"--config={spec}: no such config file {path!r}"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line error (exit status 2) for a missing config file, an
    override of an unknown field, and a value a flag or the config file refuses (a malformed
    number, an unknown variant)."""
    if problem := _config_file_problem(argv):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, ValueError) as e:  # --config.gae.lambda_actor=abc, FILE:bogus.
        lines = [line for line in str(e).splitlines() if line.strip()]
        if "Traceback (most recent call last):" in lines:  # The config file's: its last line.
            lines = [lines[0].rstrip(":") + ":", lines[-1]]
        print("error: " + " ".join(lines), file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError):
        try:
            problems = unknown_overrides(argv)
        except Exception:  # The config file itself is broken: absl's own error says more.
            problems = []
        if not problems:
            raise
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
