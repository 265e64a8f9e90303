"""``--stop-at METRIC>=VALUE`` (or ``<=``): the condition on a held-out metric that ends a run early.

A run evaluates every --eval-every steps; the first evaluation at which the condition holds ends it
there, saved, with ``stopped_at`` in summary.json and exit 0 (a sweep stops its solved points so). The
metrics are the evaluator's, gathered over every rank, so every rank sees the same value and the step is
the same on any number of processes and across a resume.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Tuple

from distseq.errors import ConfigError

FORM = re.compile(r"^\s*(?P<metric>[A-Za-z_][\w/.]*)\s*(?P<op>>=|<=)\s*(?P<value>\S+)\s*$")
FORM_HINT = "METRIC>=VALUE or METRIC<=VALUE, e.g. 'eval/accuracy>=0.99' or 'eval/loss<=0.05'"


def eval_metrics(head: str) -> Tuple[str, ...]:
    """The metrics an evaluation logs for a task of ``head`` (training/evaluation.py's ``evaluate``)."""
    return ("eval/loss", "eval/accuracy") + (("eval/sequence_accuracy",) if head == "per-step" else ())


@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str  # ">=" or "<="
    value: float

    @classmethod
    def parse(cls, text: str, head: str) -> "Threshold":
        """``text`` as --stop-at spells it, for a task of ``head``; a ConfigError names what is wrong."""
        match = FORM.match(text or "")
        if not match:
            raise ConfigError("--stop-at", f"expected {FORM_HINT} (got {text!r})")
        metric, op = match["metric"], match["op"]
        try:
            value = float(match["value"])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError("--stop-at", f"{match['value']!r} is not a finite number ({FORM_HINT})")
        allowed = eval_metrics(head)
        if metric not in allowed:
            raise ConfigError("--stop-at", f"{metric!r} is not an evaluation metric of a {head!r} task (choose from "
                                           f"{', '.join(allowed)})")
        return cls(metric, op, value)

    def holds(self, metrics: Dict[str, float]) -> bool:
        got = metrics[self.metric]
        return got >= self.value if self.op == ">=" else got <= self.value

    def record(self, step: int, metrics: Dict[str, float]) -> dict:
        """What summary.json's ``stopped_at`` says: the step, the condition and the metric's value there."""
        return {"step": step, "condition": str(self), self.metric: metrics[self.metric]}

    def said(self, step: int, metrics: Dict[str, float]) -> str:
        return f"--stop-at {self} holds at step {step} ({self.metric}={metrics[self.metric]:.6g})"

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"
