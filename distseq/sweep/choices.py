"""What a sweep report compares: the metric, and which axis each table and plot runs along.

Each choice may be given; the rest default from the sweep's axes: ``by`` (the axis tuned over in table
(a), the plots' x) is ``lr`` where the sweep has it, else its last non-seed axis; ``lines`` (one line per
value) is the model (``kind``, the field behind --model) or else the next free axis; ``panels`` is
``hidden_size`` or the next free axis; ``smallest`` (table (c)) is ``hidden_size`` where present. The
threshold is the one asked for, else the sweep's own --stop-at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

from distseq.config.threshold import Threshold
from distseq.errors import ConfigError

from .results import SEED, parse_condition

USES = ("best", "final")


@dataclass(frozen=True)
class Choices:
    metric: str  # an evaluation metric, e.g. eval/accuracy
    use: str  # "best": each point's best evaluation of it; "final": its last
    by: Optional[str]  # table (a)'s axis and the plots' x
    lines: Optional[str]  # one line per value in each plot
    panels: Optional[str]  # one panel per value
    smallest: Optional[str]  # table (c): the axis whose smallest value reaching the threshold is sought
    threshold: Optional[Threshold]
    threshold_from: str = ""  # "the sweep's --stop-at" or "asked for"


def choose(axes: Dict[str, list], stop_at: Optional[str], *, metric: str, use: str, by: Optional[str],
           lines: Optional[str], panels: Optional[str], smallest: Optional[str],
           threshold: Union[str, Threshold, None]) -> Choices:
    """The choices given, checked (a one-line ConfigError naming the option), and the rest defaulted."""
    _check_metric(metric, use)
    for option, axis in (("--by", by), ("--lines", lines), ("--panels", panels), ("--smallest", smallest)):
        if axis is not None and axis not in axes:
            known = ", ".join(axes) or "none"
            raise ConfigError(option, f"{axis!r} is not an axis of this sweep (choose from {known})")
    given = [a for a in (by, lines, panels) if a is not None]
    if len(set(given)) < len(given):
        raise ConfigError("--by", f"--by, --lines and --panels need different axes (got {', '.join(given)})")
    free = [a for a in axes if a != SEED and a not in given]
    by = by or _take(free, ("lr",), last=True)
    lines = lines or _take(free, ("kind", "model"))
    panels = panels or _take(free, ("hidden_size",))
    smallest = smallest or ("hidden_size" if "hidden_size" in axes else None)
    asked = threshold is not None
    if isinstance(threshold, str):
        threshold = parse_condition(threshold)
    elif threshold is None and stop_at:
        threshold = parse_condition(stop_at, "sweep.json stop_at")
    source = "asked for" if asked else "the sweep's --stop-at" if threshold else ""
    return Choices(metric, use, by, lines, panels, smallest, threshold, source)


def _take(free: List[str], preferred: Sequence[str], last: bool = False) -> Optional[str]:
    """The first preferred axis still free, else the first (or last) free one; taken off ``free``."""
    pick = next((a for a in preferred if a in free), None)
    if pick is None and free:
        pick = free[-1] if last else free[0]
    if pick is not None:
        free.remove(pick)
    return pick


def _check_metric(metric: str, use: str) -> None:
    if not metric.startswith("eval/") or metric == "eval/":
        raise ConfigError("--metric", f"expected an evaluation metric such as eval/accuracy, eval/loss or "
                                      f"eval/sequence_accuracy (got {metric!r})")
    if use not in USES:
        raise ConfigError("--use", f"expected one of {', '.join(USES)} (got {use!r})")
