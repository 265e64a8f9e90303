"""Where a run's start-up goes: the seconds from this process's start to its first optimizer step, by phase.

The phases are the order of ``loop.build_run``: the interpreter and its imports, indexing the data
files, building the model, the precision probe, the rendezvous (the Accelerator: every rank waits
here for the slowest to arrive), the run directory and the optimizer, resuming, the data pipeline,
then the first step itself. On many ranks the phase that grows shows what to fix; summary.json keeps
the main process's timeline and ``distseq bench startup`` compares 1 to 8 processes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Dict

_IMPORTED = time.time()  # the fall-back start where /proc is missing


def process_start_unix() -> float:
    """When this process started (Linux: its start time in /proc against the uptime, 10 ms resolution),
    else when this module was first imported (after torch: the imports are then undercounted)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, after comm
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started = time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED
    return started if started <= _IMPORTED else _IMPORTED  # never after this module was imported


def started_for_distseq() -> bool:
    """This process was started to run distseq (``distseq ...``, ``python -m distseq.cli``, a launcher's rank),
    not a notebook or a script that calls ``distseq.train`` after doing other things."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", "") or ""
    return spec_name.startswith("distseq") or os.path.basename(sys.argv[0] if sys.argv else "") == "distseq"


class StartupTimeline:
    """Seconds per phase, each mark closing the phase that ended there. From the process's start when it was
    started for distseq; otherwise (``distseq.train`` from Python) from the call, so "imports" is ~0."""

    def __init__(self):
        self.started = process_start_unix() if started_for_distseq() else time.time()
        self.last = self.started
        self.phases: Dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + max(now - self.last, 0.0)
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.started

    def report(self) -> dict:
        return {"seconds_to_first_step": self.total, "process_start_unix": self.started,
                "first_step_done_unix": self.last, "phases_seconds": dict(self.phases)}

    def line(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases.items())
        return f"distseq: start-up {self.total:.1f} s to the end of the first step: {parts}"
