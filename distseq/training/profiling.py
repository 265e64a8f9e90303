"""``--profile-steps A:B``: a torch.profiler trace of optimizer steps A+1..B, and where a step's time goes.

The trace is written in the TensorBoard profiler plugin's format (``*.pt.trace.json``) under
``RUN/tensorboard/profile/`` so ``tensorboard --logdir RUN/tensorboard`` shows it next to the scalars.
The training loop marks its phases with :meth:`StepProfiler.span`; the spans cost nothing outside the
profiled range (a ``nullcontext``), so an unprofiled run pays no bookkeeping.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function, tensorboard_trace_handler

# the loop's phases, in step order; "other" is the step time none of them covers
PHASES = ("data", "forward_backward", "optimizer", "logging")
SPAN_PREFIX = "distseq/"
TOP_OPERATORS = 12


class StepProfiler:
    """Profiles the optimizer steps whose 0-based index is in [first, last) on every rank.

    ``begin(step)`` before a step and ``end(done)`` after it; ``span(phase)`` around each phase.
    On the last profiled step the trace is exported and ``report()`` holds the figures.
    """

    def __init__(self, steps: Optional[Tuple[int, int]], run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = steps or (-1, -1)
        self.trace_dir = run_dir / "tensorboard" / "profile"
        self.rank, self.device = rank, device
        self.profiler: Optional[profile] = None
        self.started = 0.0
        self.result: Optional[dict] = None

    @property
    def active(self) -> bool:
        return self.profiler is not None

    def span(self, phase: str):
        return record_function(SPAN_PREFIX + phase) if self.profiler is not None else contextlib.nullcontext()

    def begin(self, step: int) -> None:
        """Start at the first step of the range this run reaches (a resumed run may start inside it)."""
        if self.profiler is not None or self.result is not None or not self.first <= step < self.last:
            return
        self.first = step
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        self.started = time.perf_counter()

    def end(self, done: int) -> Optional[dict]:
        """After step ``done``: stop, export and summarise once the range is complete."""
        if self.profiler is None or done != self.last:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        tensorboard_trace_handler(str(self.trace_dir), worker_name=f"rank{self.rank}")(self.profiler)
        self.result = self._summarise(self.profiler, seconds)
        self.profiler = None
        return self.result

    def _summarise(self, prof: profile, seconds: float) -> dict:
        steps = self.last - self.first
        averages = prof.key_averages()
        phase_us = {e.key[len(SPAN_PREFIX):]: e.cpu_time_total for e in averages if e.key.startswith(SPAN_PREFIX)}
        step_us = 1e6 * seconds
        shares = {phase: phase_us.get(phase, 0.0) / step_us for phase in PHASES}
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        operators = sorted((e for e in averages if not e.key.startswith(SPAN_PREFIX)),
                           key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPERATORS]
        top: List[Dict] = [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
                            "cpu_total_ms": e.cpu_time_total / 1000} for e in operators]
        return {"steps": [self.first, self.last], "step_ms": 1000 * seconds / steps, "step_time_shares": shares,
                "top_operators": top, "trace_dir": str(self.trace_dir)}


def format_profile(result: dict) -> str:
    """The operator table and the step-time shares, for the log."""
    first, last = result["steps"]
    lines = [f"distseq: profiled steps {first + 1}..{last} ({result['step_ms']:.2f} ms/step); trace in "
             f"{result['trace_dir']}",
             "  step time: " + "  ".join(f"{k}={100 * v:.1f}%" for k, v in result["step_time_shares"].items()),
             f"  {'operator':<44} {'calls':>7} {'self cpu ms':>12} {'cpu total ms':>13}"]
    lines += [f"  {op['name'][:44]:<44} {op['calls']:>7} {op['self_cpu_ms']:>12.2f} {op['cpu_total_ms']:>13.2f}"
              for op in result["top_operators"]]
    return "\n".join(lines)
