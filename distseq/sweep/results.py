"""One row per point of a sweep, read from its files alone: ``results.csv`` and ``results.json``.

A point's row holds its overrides, its state (``layout.point_status``) and, once it is complete, what its
``summary.json`` says: the final evaluation, the best one over ``eval_history`` (the highest accuracy, the
lowest loss), the step that first met the threshold, training seconds, tokens, parameters and steps. A
point that is not complete keeps its row, with its state and why, and empty metrics: a partial or
interrupted value would read as a result. Rows follow the manifest's order.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from distseq.config.threshold import FORM, FORM_HINT, Threshold
from distseq.errors import ConfigError
from distseq.fsio import write_json, write_text_atomically

from .layout import Point, point_status

KNOWN_METRICS = ("eval/loss", "eval/accuracy", "eval/sequence_accuracy")  # in the order the columns show them
NOT_METRICS = ("eval/samples",)  # a count, not a score
LOWER_IS_BETTER = ("loss", "error", "perplexity")
SEED = "seed"  # the axis whose values are repeats of one setting, not settings


def lower_is_better(metric: str) -> bool:
    return any(word in metric.rsplit("/", 1)[-1] for word in LOWER_IS_BETTER)


def parse_condition(text: str, option: str = "--threshold") -> Threshold:
    """``eval/accuracy>=0.99`` as --stop-at spells it; unlike --stop-at's own parse it needs no task's head,
    since the report reads metrics from files."""
    match = FORM.match(text or "")
    if not match:
        raise ConfigError(option, f"expected {FORM_HINT} (got {text!r})")
    try:
        value = float(match["value"])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(option, f"{match['value']!r} is not a finite number ({FORM_HINT})")
    return Threshold(match["metric"], match["op"], value)


@dataclass
class PointResult:
    name: str
    overrides: dict
    status: str  # one of layout.STATUSES
    reason: str = ""  # why a point is not complete; empty when it is
    final: Dict[str, float] = field(default_factory=dict)  # metric -> the last evaluation's value
    best: Dict[str, float] = field(default_factory=dict)  # metric -> the best over its evaluations
    reached_at_step: Optional[int] = None  # the first evaluation step where the threshold held
    steps: Optional[int] = None
    train_seconds: Optional[float] = None
    tokens: Optional[int] = None
    parameters: Optional[int] = None
    state_size: Optional[int] = None  # numbers one layer carries from token to token (summary.json)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def score(self, metric: str, use: str = "best") -> Optional[float]:
        """The value a table compares: the point's best (``use="best"``) or final evaluation of ``metric``."""
        return (self.best if use == "best" else self.final).get(metric)


def read_summary(run_dir: Path) -> dict:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def metrics_of(entry: dict) -> Dict[str, float]:
    """The evaluation metrics of a summary or history entry; a non-finite value (null in strict JSON) is none."""
    return {key: float(value) for key, value in entry.items()
            if key.startswith("eval/") and key not in NOT_METRICS
            and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def best_metrics(evaluations: List[Dict[str, float]]) -> Dict[str, float]:
    best: Dict[str, float] = {}
    for metrics in evaluations:
        for key, value in metrics.items():
            if key not in best:
                best[key] = value
            else:
                best[key] = min(best[key], value) if lower_is_better(key) else max(best[key], value)
    return best


def reached_at(summary: dict, history: List[dict], threshold: Optional[Threshold]) -> Optional[int]:
    """Where the run stopped on this very condition, its ``stopped_at`` step; else the first evaluation
    where the condition holds (a report may ask for another threshold than the sweep's --stop-at)."""
    if threshold is None:
        return None
    stopped = summary.get("stopped_at")
    if isinstance(stopped, dict) and _same_condition(stopped.get("condition"), threshold):
        return stopped.get("step")
    for entry in history:
        value = metrics_of(entry).get(threshold.metric)
        if value is not None and threshold.holds({threshold.metric: value}):
            return entry.get("step")
    return None


def _same_condition(text, threshold: Threshold) -> bool:
    try:
        return parse_condition(str(text)) == threshold
    except ConfigError:
        return False


def not_complete_reason(status: str, reason: Optional[str], summary: dict) -> str:
    if status == "failed":
        return reason or "failed"
    if status == "pending":
        return "not started"
    if summary.get("step") is not None:  # a stop signal or preemption wrote its summary on the way out
        return f"saved at step {summary['step']} ({summary.get('status', 'stopped')}); a rerun resumes it"
    return "started, no summary yet (running, or killed); a rerun resumes it"


def read_point(sweep_dir: Path, point: Point, threshold: Optional[Threshold]) -> PointResult:
    run_dir = Path(sweep_dir) / point.name
    status, reason = point_status(run_dir)
    summary = read_summary(run_dir)
    if status != "complete":
        return PointResult(point.name, dict(point.overrides), status, not_complete_reason(status, reason, summary))
    history = [entry for entry in summary.get("eval_history") or [] if isinstance(entry, dict)]
    final = metrics_of(summary)
    return PointResult(point.name, dict(point.overrides), status, final=final,
                       best=best_metrics([metrics_of(entry) for entry in history] + [final]),
                       reached_at_step=reached_at(summary, history, threshold), steps=summary.get("step"),
                       train_seconds=summary.get("train_seconds"), tokens=summary.get("tokens"),
                       parameters=summary.get("parameters"), state_size=summary.get("state_size_per_layer"))


def axes_of(manifest: dict, points: List[Point]) -> Dict[str, list]:
    """{option field: its values}: the grid's axes in order, then any other field a listed point overrides,
    with its values in the order the points first give them."""
    axes = {name: list(values) for name, values in (manifest.get("axes") or {}).items()}
    for point in points:
        for name, value in point.overrides.items():
            values = axes.setdefault(name, [])
            if value not in values:
                values.append(value)
    return axes


def metrics_seen(results: List[PointResult], *wanted: Optional[str]) -> List[str]:
    """Every metric a point reported, and those the report asks for: the known ones first, in their order."""
    seen = {key for r in results for key in (*r.final, *r.best)} | {m for m in wanted if m}
    return [m for m in KNOWN_METRICS if m in seen] + sorted(seen - set(KNOWN_METRICS))


def columns(axes: Dict[str, list], metrics: List[str]) -> List[str]:
    return ["name", *axes, "status", "reason", *(f"final {m}" for m in metrics), *(f"best {m}" for m in metrics),
            "reached_at_step", "steps", "train_seconds", "tokens", "parameters", "state_size"]


def row_of(result: PointResult, axes: Dict[str, list], metrics: List[str]) -> dict:
    row = {"name": result.name, **{axis: result.overrides.get(axis) for axis in axes},
           "status": result.status, "reason": result.reason}
    row.update({f"final {m}": result.final.get(m) for m in metrics})
    row.update({f"best {m}": result.best.get(m) for m in metrics})
    row.update(reached_at_step=result.reached_at_step, steps=result.steps, train_seconds=result.train_seconds,
               tokens=result.tokens, parameters=result.parameters, state_size=result.state_size)
    return row


def write_results(out: Path, results: List[PointResult], axes: Dict[str, list], metrics: List[str],
                  about: dict) -> None:
    """``results.csv`` (an empty cell for a value the point does not have) and ``results.json`` (null there,
    the columns in order, and ``about``: what the report compared)."""
    header, rows = columns(axes, metrics), [row_of(r, axes, metrics) for r in results]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    write_text_atomically(out / "results.csv", text.getvalue())
    write_json(out / "results.json", {**about, "columns": header, "rows": rows})
