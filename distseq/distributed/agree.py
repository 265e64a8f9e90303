"""Agreement between ranks: the two forms every place uses where a mismatch would mean a hang.

- ``any_rank`` (and ``max_over_ranks``): every rank learns whether something is true on any rank, in one
  all-reduce. For outcomes each rank meets on its own (its part of a checkpoint failed to write, its
  data files changed, a stop signal reached it), so that every rank takes the same branch.
- ``main_decides``: the main process decides (prepares the run directory, picks the checkpoint, starts
  the trackers) and every rank follows: its result, or the one-line error it raised, reaches every rank
  in one broadcast, so a refusal is the same error everywhere instead of a hang.

On one process both are plain calls: no collective, no process group needed.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
from accelerate import Accelerator

from distseq.errors import DistseqError

T = TypeVar("T")


def max_over_ranks(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``values`` over every rank (one all-reduce; ``values`` on one process)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.to(accelerator.device), "max")


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if accelerator.num_processes == 1:
        return bool(flag)
    return bool(max_over_ranks(accelerator, torch.tensor(float(bool(flag)))).item())


def main_decides(accelerator: Accelerator, decide: Callable[[], T], *, share: bool = True,
                 failure: Optional[Callable[[Exception], DistseqError]] = None) -> Optional[T]:
    """Run ``decide`` on the main process only; every rank returns its result (``share``; else the other
    ranks return None, e.g. when the result is a lock only the main process may hold) or raises the
    DistseqError it raised. ``failure`` turns any other exception of ``decide`` into the error every rank
    raises (without it, such an exception is the main process's own and the others learn nothing)."""
    outcome: list = [None, None]  # result, error
    if accelerator.is_main_process:
        try:
            outcome[0] = decide()
        except DistseqError as error:
            outcome[1] = error
        except Exception as error:
            if failure is None:
                raise
            outcome[1] = failure(error)
    result = outcome[0]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [outcome[0] if share else None, outcome[1]]
        broadcast_object_list(shared)
        result = shared[0] if share or not accelerator.is_main_process else outcome[0]
        outcome[1] = shared[1]
    if outcome[1] is not None:
        raise outcome[1]
    return result
