"""A sweep directory, and how each of its points stands, read from the files alone.

``SWEEP/sweep.json`` (the manifest) records the spec's hash, its axes and every point: a name, the
overrides that make it (``{option field: value}``) and the ``distseq train`` arguments it runs. Each
point is an ordinary run directory, ``SWEEP/<name>/``. A point's state needs nothing but that directory:
``complete`` (its summary.json says so), ``failed`` (``sweep-failed.json``: the exit code and the point's
one-line reason), ``interrupted`` (started, neither: a stop signal, a kill, a preemption; a rerun resumes
it from its checkpoint) or ``pending`` (no directory yet). So a report can be built at any time, from a
partial sweep, on any machine that sees the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

MANIFEST = "sweep.json"
FAILURE = "sweep-failed.json"  # in a point's run dir: {"exit_code", "reason"}
LOCK = ".sweep.lock"
FORMAT_VERSION = 1
STATUSES = ("complete", "failed", "interrupted", "pending")


@dataclass(frozen=True)
class Point:
    name: str  # its run dir's name under the sweep dir: readable, stable, derived from the overrides
    overrides: dict = field(default_factory=dict)  # {option field name: value} over the base
    argv: Tuple[str, ...] = ()  # `distseq train` arguments, --run-dir excepted


def read_manifest(sweep_dir: Path) -> Optional[dict]:
    """The manifest, or None where no sweep was started."""
    path = Path(sweep_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def points_of(manifest: dict) -> List[Point]:
    return [Point(p["name"], dict(p["overrides"]), tuple(p["argv"])) for p in manifest["points"]]


def point_status(run_dir: Path) -> Tuple[str, Optional[str]]:
    """(one of STATUSES, the failure's one-line reason or None)."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    if isinstance(summary, dict) and summary.get("status") == "complete":
        return "complete", None
    try:
        failure = json.loads((run_dir / FAILURE).read_text())
        return "failed", str(failure.get("reason", "failed"))
    except (OSError, ValueError):
        pass
    return ("interrupted" if run_dir.is_dir() else "pending"), None
