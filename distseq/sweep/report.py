"""``distseq sweep report SWEEP_DIR``: a sweep's results, tables, plots and ``report.md``, from its files alone.

``build_report`` reads the manifest (``SWEEP/sweep.json``) and each point's run directory, and nothing
else: it works at any moment, on a partial sweep, on any machine that sees the files. It writes into
``SWEEP/report/`` (or ``out``):

- ``results.csv`` and ``results.json``: one row per point of the manifest, in its order
  (``results.py``), the points not complete included, with their state and why;
- ``report.md``: the tables (``tables.py``): (a) the best metric over ``by`` per setting of the other
  axes, (b) mean and spread over seeds where the sweep has a ``seed`` axis, (c) the smallest value of
  ``smallest`` that reaches the threshold; then every point not complete and why; then the plots;
- PNGs (``plots.py``) where matplotlib is installed; without it, one line in report.md says how to get
  them.

``report_command(args)`` is the command line's entry; ``add_arguments(parser)`` declares its arguments.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Union

from distseq.config.threshold import Threshold
from distseq.errors import ConfigError
from distseq.fsio import check_output_dir, write_text_atomically
from distseq.plotting import plots_hint

from .choices import Choices, choose
from .layout import MANIFEST, STATUSES, points_of, read_manifest
from .plots import write_plots
from .results import SEED, PointResult, axes_of, lower_is_better, metrics_seen, read_point, write_results
from .tables import Table, best_over, over_seeds, smallest_reaching

REPORT_DIR = "report"  # under the sweep dir; no point may take this name
PLOTS_HINT = plots_hint("distseq sweep report")


@dataclass
class Report:
    sweep_dir: Path
    out: Path  # where the files were written
    choices: Choices
    results: List[PointResult]  # one per point, in the manifest's order
    tables: List[Table]
    plots: Optional[List[str]]  # the PNGs' names in ``out``; None where matplotlib is not installed
    markdown: str  # report.md's text

    def counts(self) -> dict:
        return {status: sum(r.status == status for r in self.results) for status in STATUSES}

    def text(self) -> str:
        """What the command prints: the tables, the points not complete, and where the files are."""
        count = len(self.plots or [])
        written = f"{count} plot{'' if count == 1 else 's'}" if self.plots is not None else f"no plots ({PLOTS_HINT})"
        return "\n".join([headline(self), *(t.markdown() for t in self.tables), not_complete(self.results),
                          f"distseq sweep report: wrote results.csv, results.json, report.md and {written} "
                          f"in {self.out}"])


def build_report(sweep_dir: Union[str, Path], *, metric: str = "eval/accuracy", use: str = "best",
                 by: Optional[str] = None, lines: Optional[str] = None, panels: Optional[str] = None,
                 smallest: Optional[str] = None, threshold: Union[str, Threshold, None] = None,
                 out: Union[str, Path, None] = None) -> Report:
    """Read the sweep at ``sweep_dir`` and write its report (see the module's doc).

    ``metric``: the evaluation metric the tables and plots compare; ``use``: each point's ``"best"``
    evaluation of it (highest accuracy, lowest loss) or its ``"final"`` one. ``by``, ``lines``, ``panels``,
    ``smallest``: axes (option fields the sweep varies) for table (a) and the plots' x, the plots' lines,
    their panels, and table (c); each defaults from the axes (``choices.py``). ``threshold``: a condition as
    --stop-at spells it (``"eval/accuracy>=0.99"``), else the sweep's own --stop-at. ``out``: the directory
    written, ``SWEEP/report`` by default. A bad choice or a directory that is not a sweep is a ConfigError.
    """
    sweep_dir = Path(sweep_dir)
    manifest = load_manifest(sweep_dir)
    points = points_of(manifest)
    axes = axes_of(manifest, points)
    c = choose(axes, manifest.get("stop_at"), metric=metric, use=use, by=by, lines=lines, panels=panels,
               smallest=smallest, threshold=threshold)
    out = check_output_dir("--out", out if out is not None else sweep_dir / REPORT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    results = [read_point(sweep_dir, point, c.threshold) for point in points]
    metrics = metrics_seen(results, c.metric, c.threshold.metric if c.threshold else None)
    plots = replace_plots(out, results, axes, c, sweep_dir.resolve().name)
    write_results(out, results, axes, metrics,
                  {"sweep": str(sweep_dir), "axes": axes, "metric": c.metric, "use": c.use,
                   "threshold": str(c.threshold) if c.threshold else None, "plots": plots or []})
    report = Report(sweep_dir, out, c, results, make_tables(results, axes, c), plots, "")
    report.markdown = report_markdown(report)
    write_text_atomically(out / "report.md", report.markdown)
    return report


def load_manifest(sweep_dir: Path) -> dict:
    try:
        manifest = read_manifest(sweep_dir)
    except (OSError, ValueError) as error:
        raise ConfigError("SWEEP_DIR", f"cannot read {sweep_dir / MANIFEST}: {error}") from None
    if manifest is None:
        raise ConfigError("SWEEP_DIR", f"{sweep_dir} has no {MANIFEST}: not a sweep directory, or its sweep has "
                                       "not started")
    return manifest


def replace_plots(out: Path, results: List[PointResult], axes: dict, c: Choices, title: str) -> Optional[List[str]]:
    """This report's PNGs; those of the report before it that this one did not draw (another choice of
    axes or metric) are removed, so report/ never shows a figure report.md does not embed."""
    stale = previous_plots(out)
    plots = write_plots(out, results, axes, c, title)
    for name in stale - set(plots or []):
        (out / name).unlink(missing_ok=True)
    return plots


def previous_plots(out: Path) -> set:
    """The PNGs the last report in ``out`` listed in its results.json, and never any other file."""
    try:
        listed = json.loads((out / "results.json").read_text()).get("plots") or []
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in listed if isinstance(n, str) and n.endswith(".png") and "/" not in n and n != ".png"}


def make_tables(results: List[PointResult], axes: dict, c: Choices) -> List[Table]:
    tables = []
    if c.by is not None:
        tables.append(best_over(results, axes, c.by, c.metric, c.use))
    if SEED in axes:
        tables.append(over_seeds(results, axes, c.metric, c.use))
    if c.smallest and c.threshold:
        tables.append(smallest_reaching(results, axes, c.smallest, c.by, c.threshold))
    else:
        needs = [need for need, missing in (
            ("a threshold (the sweep has no --stop-at): pass --threshold 'eval/accuracy>=0.99'", not c.threshold),
            ("an axis to minimise (the sweep has no hidden_size axis): pass --smallest AXIS", not c.smallest))
            if missing]
        tables.append(Table("Smallest value that reaches a threshold", [], [],
                            notes=[f"Not built: it needs {' and '.join(needs)}."]))
    return tables


def headline(report: Report) -> str:
    c, counts = report.choices, report.counts()
    states = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    words = (f"each point's best over its evaluations ({'lower' if lower_is_better(c.metric) else 'higher'} is "
             "better)" if c.use == "best" else "each point's final evaluation")
    threshold = f"`{c.threshold}` ({c.threshold_from})" if c.threshold else "none"
    seeds = "; seeds averaged" if any(SEED in r.overrides for r in report.results) else ""
    return (f"# Sweep report: {report.sweep_dir.resolve().name}\n\n"
            f"{len(report.results)} points in `{report.sweep_dir}`: {states or 'none'}.\n"
            f"Metric: `{c.metric}`, {words}{seeds}. Threshold: {threshold}.\n"
            "Every point is a row of [results.csv](results.csv) and [results.json](results.json).\n")


def not_complete(results: List[PointResult]) -> str:
    left = [r for r in results if not r.complete]
    lines = ["## Points not complete", ""]
    if not left:
        return "\n".join(lines + ["None: every point is complete."]) + "\n"
    lines += ["| point | status | reason |", "| --- | --- | --- |"]
    lines += [f"| {r.name} | {r.status} | {r.reason.replace('|', '/')} |" for r in left]
    return "\n".join(lines) + "\n"


def report_markdown(report: Report) -> str:
    parts = [headline(report), *(t.markdown() for t in report.tables), not_complete(report.results), "## Plots\n"]
    if report.plots is None:
        parts.append(PLOTS_HINT + "\n")
    else:
        parts.append("\n".join(f"![{name[:-4]}]({name})" for name in report.plots) + "\n" if report.plots
                     else "None: the sweep has no axis to draw against.\n")
    return "\n".join(parts)


REPORT_OPTIONS = ("metric", "use", "by", "lines", "panels", "smallest", "threshold", "out")


def add_arguments(parser: argparse.ArgumentParser, with_dir: bool = True) -> None:
    """The arguments of ``distseq sweep report``, as ``report_command`` reads them (``with_dir``: the
    positional SWEEP_DIR too; ``distseq sweep`` has its own)."""
    if with_dir:
        parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep directory (holds sweep.json)")
    parser.add_argument("--metric", default="eval/accuracy",
                        help="evaluation metric to compare (eval/accuracy, eval/loss, eval/sequence_accuracy)")
    parser.add_argument("--use", choices=("best", "final"), default="best",
                        help="each point's best evaluation of the metric (default) or its final one")
    parser.add_argument("--by", metavar="AXIS", help="axis tuned over in the best-of table, the plots' x "
                                                     "(default: lr, else the last axis)")
    parser.add_argument("--lines", metavar="AXIS", help="one plotted line per value (default: the model)")
    parser.add_argument("--panels", metavar="AXIS", help="one plot panel per value (default: hidden_size)")
    parser.add_argument("--smallest", metavar="AXIS", help="axis whose smallest value reaching the threshold is "
                                                           "tabled (default: hidden_size)")
    parser.add_argument("--threshold", metavar="CONDITION",
                        help="e.g. 'eval/accuracy>=0.99' (default: the sweep's --stop-at)")
    parser.add_argument("--out", metavar="DIR", help="where to write (default: SWEEP_DIR/report)")


def report_command(args: argparse.Namespace, log: Callable[[str], None] = print) -> None:
    """Build the report of ``args.sweep_dir`` and print its tables; the CLI maps a ConfigError to exit 2."""
    report = build_report(args.sweep_dir, metric=getattr(args, "metric", "eval/accuracy"),
                          use=getattr(args, "use", "best"), by=getattr(args, "by", None),
                          lines=getattr(args, "lines", None), panels=getattr(args, "panels", None),
                          smallest=getattr(args, "smallest", None), threshold=getattr(args, "threshold", None),
                          out=getattr(args, "out", None))
    log(report.text())
