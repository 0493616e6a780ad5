"""Where benchmark results go: ``benchmarks/results/<name>_<backend>.json`` unless given."""

from __future__ import annotations

import json
import os

import jax


def write_report(report: dict, name: str, out: str | None = None) -> str:
    out = out or os.path.join(
        os.path.dirname(__file__), "results", f"{name}_{jax.default_backend()}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")
    return out
