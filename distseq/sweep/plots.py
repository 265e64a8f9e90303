"""The sweep report's PNGs: the metric against one axis, one line per value of another, one panel per a
third; one figure per combination of any axes left over (the seeds are averaged, their spread drawn as
error bars).

A value of x where none of a line's points is complete is marked with an ``x`` on the panel's bottom
edge, and each panel's title counts its points not complete: a hole in a curve is never silent.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

from distseq.plotting import pyplot

from .choices import Choices
from .results import SEED, PointResult
from .tables import Group, combos, matching, numeric, value_text, values_of

LOG_SPAN = 10  # an x axis whose positive values span more than this factor is drawn on a log scale


def write_plots(out: Path, results: List[PointResult], axes: Dict[str, list], c: Choices,
                title: str) -> Optional[List[str]]:
    """The PNGs' names in ``out``, or None where matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    if c.by is None:  # a sweep without axes: nothing to draw against
        return []
    extra = [a for a in axes if a not in (c.by, c.lines, c.panels, SEED)]
    written = []
    for combo in combos(results, axes, extra):
        name = file_name(c.metric, c.by, extra, combo)
        subtitle = ", ".join(f"{a}={value_text(v)}" for a, v in zip(extra, combo))
        draw_figure(plt, matching(results, extra, combo), axes, c, f"{title}: {c.metric} vs {c.by}"
                    + (f" ({subtitle})" if subtitle else ""), out / name)
        plt.close("all")
        written.append(name)
    return written


def file_name(metric: str, by: str, extra: List[str], combo: tuple) -> str:
    name = f"{metric}_vs_{by}" + "".join(f"-{a}={value_text(v)}" for a, v in zip(extra, combo))
    return re.sub(r"[^A-Za-z0-9._=-]", "_", name) + ".png"


def draw_figure(plt, members: List[PointResult], axes: Dict[str, list], c: Choices, title: str, path: Path) -> None:
    panel_values = values_of(members, axes, c.panels) if c.panels else [None]
    fig, grid = plt.subplots(1, len(panel_values), figsize=(4.4 * len(panel_values) + 0.6, 3.8), sharey=True,
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, value in zip(grid[0], panel_values):
        here = matching(members, [c.panels], [value]) if c.panels else members
        draw_panel(ax, here, axes, c, colors)
        left = sum(not r.complete for r in here)
        ax.set_title((f"{c.panels}={value_text(value)}" if c.panels else "")
                     + (f" ({left} of {len(here)} points not complete)" if left else ""), fontsize=9)
    grid[0][0].set_ylabel(f"{c.metric} ({c.use} per point, mean over seeds)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def draw_panel(ax, here: List[PointResult], axes: Dict[str, list], c: Choices, colors: List[str]) -> None:
    xs = values_of(here, axes, c.by)
    positions = xs if numeric(xs) else list(range(len(xs)))  # categorical x: one slot per value
    line_values = values_of(here, axes, c.lines) if c.lines else [None]
    holes_drawn = False
    for i, line in enumerate(line_values):
        mine = matching(here, [c.lines], [line]) if c.lines else here
        groups = [Group(matching(mine, [c.by], [x]), c.metric, c.use) for x in xs]
        color = colors[i % len(colors)]  # the same value keeps its color in every panel
        drawn = [(p, g) for p, g in zip(positions, groups) if g.mean is not None]
        if drawn:
            ax.errorbar([p for p, _ in drawn], [g.mean for _, g in drawn], yerr=[g.std or 0.0 for _, g in drawn],
                        marker="o", markersize=4, capsize=3, color=color,
                        label=f"{c.lines}={value_text(line)}" if c.lines else c.metric)
        holes = [p for p, g in zip(positions, groups) if g.members and g.mean is None]
        if holes:  # x in data units, y on the panel's bottom edge (axes units): visible whatever the metric's range
            ax.plot(holes, [0.02] * len(holes), "x", color=color, markersize=8, clip_on=False,
                    transform=ax.get_xaxis_transform(), label=None if holes_drawn else "no complete point")
            holes_drawn = True
    if c.threshold is not None and c.threshold.metric == c.metric:
        ax.axhline(c.threshold.value, color="k", linestyle="--", linewidth=1, label=str(c.threshold))
    _x_axis(ax, xs, positions, c.by)
    ax.legend(fontsize=7)


def _x_axis(ax, xs: list, positions: list, by: str) -> None:
    if numeric(xs) and min(xs) > 0 and max(xs) / min(xs) > LOG_SPAN:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(positions, [value_text(x) for x in xs])
    ax.set_xlabel(by)
