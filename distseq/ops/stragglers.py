"""Slow ranks: each rank's time per step of its own work, compared across ranks at log steps.

Every collective makes the ranks wait for the slowest, so their wall-clock step times are equal by
construction and cannot say who is slow. What differs is the work a rank does on its own: fetching its
batch and the forward pass (before the backward's gradient sync waits for the others), and the
optimizer's update (after it). Each rank times that; at a log step one all-gather of one number per rank
gives ``perf/step_time_ms_min``, ``perf/step_time_ms_max`` and ``perf/slowest_rank``, and the log line
names the slowest rank when it is ``--straggler-factor`` times the median or more and what it adds is
at least a tenth of the step's wall time (a rank 1.6× slower by 0.7 ms of a 10 ms step is noise, not
a straggler worth a line). Under FSDP the
forward's all-gathers wait for the slowest rank too, so there a slow data pipeline shows, slow
compute much less.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, List, Tuple

import torch
from accelerate import Accelerator

MIN_SHARE_OF_STEP = 0.1  # a slow rank is named when its excess costs at least this share of a step


class RankTimes:
    """This rank's own work since the last log step, and every rank's at the last one."""

    def __init__(self, accelerator: Accelerator, factor: float):
        self.accelerator, self.factor = accelerator, factor
        self.seconds, self.steps = 0.0, 0
        self.latest: Dict[str, object] = {}  # the last log step's figures, for summary.json

    @contextlib.contextmanager
    def own_work(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - began

    def step_done(self) -> None:
        self.steps += 1

    def gather(self, step_ms: float) -> Tuple[Dict[str, float], str]:
        """Every rank's ms per step of own work since the last call (one all-gather of one number per
        rank): the scalars, and the straggler's note for the log line ("" when there is none).
        ``step_ms``: the window's wall time per step, which a straggler's excess is weighed against."""
        mine = torch.tensor([1000.0 * self.seconds / max(self.steps, 1)], dtype=torch.float64,
                            device=self.accelerator.device)
        per_rank: List[float] = (self.accelerator.gather(mine) if self.accelerator.num_processes > 1 else mine).tolist()
        self.seconds, self.steps = 0.0, 0
        self.latest, note = compare_ranks(per_rank, step_ms, self.factor)
        return {k: self.latest[k] for k in SCALARS}, note


SCALARS = ("perf/step_time_ms_min", "perf/step_time_ms_max", "perf/slowest_rank")


def compare_ranks(per_rank: List[float], step_ms: float, factor: float) -> Tuple[Dict[str, object], str]:
    """The figures of one log step (``per_rank``: ms of own work per step, by rank) and the note naming the
    slowest rank when it is ``factor`` times the median or more and its excess costs a tenth of the step."""
    slowest = max(range(len(per_rank)), key=per_rank.__getitem__)
    typical = statistics.median_low(per_rank)  # of 2 ranks: the faster one, so a slow one stands out
    figures = {"perf/step_time_ms_min": min(per_rank), "perf/step_time_ms_max": per_rank[slowest],
               "perf/slowest_rank": slowest, "perf/step_time_ms_median": typical, "rank_step_time_ms": per_rank}
    ratio = per_rank[slowest] / typical if typical > 0 else float("inf")
    costly = per_rank[slowest] - typical >= MIN_SHARE_OF_STEP * step_ms
    if not (factor and len(per_rank) > 1 and ratio >= factor and costly):
        return figures, ""
    return figures, (f"rank {slowest} is {ratio:.1f}× slower than the median ({per_rank[slowest]:.1f} ms vs "
                     f"{typical:.1f} ms per step of its own work)")
