"""What every rank agreed on after each step, read by the host without stalling the device.

Each optimizer step all-reduces two flags (``max`` over ranks, one collective): a non-finite loss or
gradient on some rank, and the number of a stop signal some rank received. The device acts on the first
itself: the fused optimizer skips the update when it is set (``optim.py``). The host needs both only to
count skipped steps, to raise under --on-nonfinite stop, and to stop at a step boundary; reading them
at once would make the host wait for the device every step.

So the flags are copied to host memory as the device computes them (an asynchronous copy into pinned
memory on a GPU, followed by an event) and read one step later, when that copy is long done: a stop
signal noticed during step N stops every rank after step N + 1, all at the same boundary. Where the loop
waits for the device anyway (a log, evaluation or checkpoint step, the last step, the end of the data, a
step saved because a stop signal was read) every pending step is read at once, so what a checkpoint
records or a log line reports is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


@dataclass(frozen=True)
class Verdict:
    """One step's flags as every rank agreed on them."""

    step: int
    skipped: bool  # non-finite loss or gradient on some rank: the update was left out everywhere
    stop: int  # a stop signal's number on some rank, else 0


class StepAgreement:
    """The agreed flags of the steps the host has not read yet (at most two)."""

    def __init__(self) -> None:
        self.pending: List[Tuple[int, torch.Tensor, Optional[torch.cuda.Event]]] = []

    def add(self, step: int, agreed: torch.Tensor) -> None:
        """``agreed`` (2,) float on the device: [non-finite, stop signal], the same on every rank."""
        event = None
        if agreed.device.type == "cuda":
            host = torch.empty(agreed.shape, dtype=agreed.dtype, pin_memory=True)
            host.copy_(agreed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            agreed = host
        self.pending.append((step, agreed, event))

    def settle(self, now: bool) -> List[Verdict]:
        """The verdicts of every pending step (``now``: the loop waits for the device here anyway), else of
        all but the newest, which is read at the next step; oldest first."""
        ready = self.pending if now else self.pending[:-1]
        self.pending = [] if now else self.pending[-1:]
        verdicts = []
        for step, flags, event in ready:
            if event is not None:
                event.synchronize()  # the copy was queued a step ago: it is done, or nearly
            skipped, stop = flags.tolist()
            verdicts.append(Verdict(step, bool(skipped), int(stop)))
        return verdicts
