r"""Entry point: ``python -m vcppo_jax.main --config=configs/vcppo.py:tiny --workdir=DIR``.

Every config field can be overridden, e.g. ``--config.gae.lambda_actor=0.99``. The config is
validated before anything runs; ``--validate_only`` prints the resolved config and exits.
Running again on the same ``--workdir`` resumes from its latest checkpoint.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys

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
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
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
    from vcppo_jax.workdir import WorkdirLockedError

    try:
        runner.run(config, _WORKDIR.value)
    except WorkdirLockedError as e:  # Nothing was touched: say so in one line.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _paths(config, prefix: str = "") -> list[str]:
    out = []
    for k, v in config.items():
        out += _paths(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"]
    return out


def unknown_overrides(argv: list[str]) -> list[str]:
    """One message per ``--config.a.b=...`` flag that names no field of the config file given
    by ``--config=FILE[:ARG]``, with the closest known names."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return []
    path, _, arg = spec.partition(":")
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


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line error for an override of an unknown field."""
    try:
        return flags.FLAGS(argv)
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
