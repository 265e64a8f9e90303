"""The tables people ask of a sweep, as markdown: the best over an axis, the spread over seeds, and the
smallest value of an axis that reaches a threshold.

A *setting* is one combination of the non-seed axes; its value is the mean over its complete seeds of
each point's score (its best evaluation of the metric, or its final one). Only complete points count;
a cell shows how many of its points that is (``0.9500 (1 of 2)``), or the states of its points where
none is complete, so a missing point is never silently dropped. A point that does not override an axis
has the base's value there, shown as ``base``.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from distseq.config.threshold import Threshold

from .results import SEED, PointResult, lower_is_better


@dataclass
class Table:
    title: str
    header: List[str]
    rows: List[List[str]]
    about: str = ""  # what a cell means, in one paragraph above the table
    notes: List[str] = field(default_factory=list)  # why it is empty or partial

    def markdown(self) -> str:
        blocks = [f"## {self.title}", self.about]
        if self.rows:
            lines = [_md_row(self.header), _md_row(["---"] * len(self.header))] + [_md_row(r) for r in self.rows]
            blocks.append("\n".join(lines))
        return "\n\n".join(block for block in (*blocks, *self.notes) if block) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def value_text(value) -> str:
    if value is None:
        return "base"
    return f"{value:g}" if isinstance(value, float) else str(value)


def number_text(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4f}"


def values_of(results: List[PointResult], axes: Dict[str, list], axis: str) -> list:
    """The axis's values in its order, and None (the base's) where some point does not override it."""
    values = list(axes[axis])
    return values + [None] if any(axis not in r.overrides for r in results) else values


def numeric(values: list) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def matching(results: List[PointResult], names: Sequence[str], combo: Sequence) -> List[PointResult]:
    return [r for r in results if all(r.overrides.get(n) == v for n, v in zip(names, combo))]


def combos(results: List[PointResult], axes: Dict[str, list], names: Sequence[str]) -> List[tuple]:
    """The combinations of ``names`` the points take (not the full product: a listed sweep has holes), in
    the axes' order."""
    seen: List[tuple] = []
    for r in results:
        combo = tuple(r.overrides.get(n) for n in names)
        if combo not in seen:
            seen.append(combo)

    def position(combo: tuple) -> tuple:
        return tuple(axes[n].index(v) if v in axes[n] else -1 for n, v in zip(names, combo))
    return sorted(seen, key=position)


def states(points: List[PointResult]) -> str:
    """``1 failed, 1 pending``: the points that are not complete."""
    counts = Counter(r.status for r in points if not r.complete)
    return ", ".join(f"{n} {status}" for status, n in counts.items())


class Group:
    """The points of one setting (or one cell) and the scores of its complete ones."""

    def __init__(self, members: List[PointResult], metric: str, use: str):
        self.members = members
        scores = [r.score(metric, use) for r in members if r.complete]
        self.scores = [s for s in scores if s is not None]

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.scores) if self.scores else None

    @property
    def std(self) -> Optional[float]:
        """The sample standard deviation (n - 1): defined from two seeds on."""
        return statistics.stdev(self.scores) if len(self.scores) > 1 else None

    def cell(self) -> str:
        if not self.members:
            return "-"
        if not self.scores:
            return states(self.members) or "no value"
        partial = f" ({len(self.scores)} of {len(self.members)})" if len(self.scores) < len(self.members) else ""
        return number_text(self.mean) + partial


def best_of(groups: Dict, metric: str):
    """The key of the group with the best mean (the lowest for a loss), or None where none has one."""
    scored = [(key, g.mean) for key, g in groups.items() if g.mean is not None]
    if not scored:
        return None
    pick = min if lower_is_better(metric) else max
    return pick(scored, key=lambda kv: kv[1])[0]


def best_over(results: List[PointResult], axes: Dict[str, list], by: str, metric: str, use: str) -> Table:
    """(a) Per setting of the other non-seed axes, the metric at each value of ``by`` and the best of them."""
    names = [a for a in axes if a not in (by, SEED)]
    by_values = values_of(results, axes, by)
    rows = []
    for combo in combos(results, axes, names):
        members = matching(results, names, combo)
        cells = {i: Group(matching(members, [by], [v]), metric, use) for i, v in enumerate(by_values)}
        best = best_of(cells, metric)
        rows.append([*map(value_text, combo), *(cells[i].cell() for i in cells),
                     "none complete" if best is None else value_text(by_values[best]),
                     "" if best is None else number_text(cells[best].mean)])
    header = [*names, *(f"{by}={value_text(v)}" for v in by_values), f"best {by}", f"best {metric}"]
    return Table(f"Best {metric} over {by}", header, rows, about=_cell_meaning(metric, use))


def over_seeds(results: List[PointResult], axes: Dict[str, list], metric: str, use: str) -> Table:
    """(b) Per setting of every non-seed axis, the mean, spread and count over its seeds."""
    names = [a for a in axes if a != SEED]
    rows = []
    for combo in combos(results, axes, names):
        group = Group(matching(results, names, combo), metric, use)
        missing = "; ".join(f"seed={value_text(r.overrides.get(SEED))} {r.status}"
                            for r in group.members if not r.complete)
        rows.append([*map(value_text, combo), number_text(group.mean), number_text(group.std),
                     f"{len(group.scores)} of {len(group.members)}", missing])
    about = (f"Each point's {_score_words(metric, use)}; mean and sample standard deviation (n - 1) over the "
             "complete seeds of each setting.")
    return Table(f"Mean and spread of {metric} over seeds", [*names, "mean", "std", "n", "not complete"], rows,
                 about=about)


def reaches(points: List[PointResult]) -> bool:
    """A setting reaches the threshold when each of its complete seeds did (and one at least is complete)."""
    done = [r for r in points if r.complete]
    return bool(done) and all(r.reached_at_step is not None for r in done)


def smallest_reaching(results: List[PointResult], axes: Dict[str, list], size: str, by: Optional[str],
                      threshold: Threshold) -> Table:
    """(c) Per setting of the axes other than ``size``, ``by`` (tuned over, as in (a)) and the seed, the
    smallest value of ``size`` at which some value of ``by`` reaches the threshold."""
    tuned = [by] if by and by != size else []
    names = [a for a in axes if a not in (size, SEED, *tuned)]
    sizes = values_of(results, axes, size)
    sizes = sorted(sizes, key=float) if numeric(sizes) else sizes
    tuned_values = values_of(results, axes, by) if tuned else [None]
    rows = []
    for combo in combos(results, axes, names):
        members = matching(results, names, combo)
        rows.append([*map(value_text, combo),
                     *_smallest_row(members, size, sizes, tuned, tuned_values)])
    header = [*names, f"smallest {size}", *(f"{by} there" for _ in tuned), "steps to reach", "not complete at or below"]
    about = (f"A setting reaches `{threshold}` when each of its complete seeds did at some evaluation; "
             + (f"{by} is tuned over (any value of it may reach); " if tuned else "")
             + "steps to reach: the mean over seeds of the first step that met it, at the quickest "
             + (f"{by}" if tuned else "setting") + ". Sizes at or below the answer with points not complete are "
             "listed: a smaller one might reach it too.")
    return Table(f"Smallest {size} that reaches {threshold}", header, rows, about=about)


def _smallest_row(members, size, sizes, tuned, tuned_values) -> List[str]:
    incomplete = []
    for value in sizes:
        at_size = matching(members, [size], [value])
        if states(at_size):
            incomplete.append(f"{size}={value_text(value)}: {states(at_size)}")
        steps = {v: _mean_steps(matching(at_size, tuned, [v])) for v in tuned_values
                 if reaches(matching(at_size, tuned, [v]))}
        if steps:
            quickest = min(steps, key=steps.get)
            there = [", ".join(value_text(v) for v in steps)] if tuned else []
            return [value_text(value), *there, f"{steps[quickest]:g}", "; ".join(incomplete)]
    return ["not reached", *([""] if tuned else []), "", "; ".join(incomplete)]


def _mean_steps(points: List[PointResult]) -> float:
    return statistics.fmean(r.reached_at_step for r in points if r.complete)


def _score_words(metric: str, use: str) -> str:
    return (f"best {metric} over its evaluations ({'lowest' if lower_is_better(metric) else 'highest'})"
            if use == "best" else f"final {metric}")


def _cell_meaning(metric: str, use: str) -> str:
    return (f"A cell: the mean over complete seeds of each point's {_score_words(metric, use)}; "
            "`(1 of 2)`: only so many of its points are complete; where none is, their states.")
