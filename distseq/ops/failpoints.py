"""Failpoints: named places where a test can make this process die by SIGKILL, pause it, slow a rank, or
forbid host synchronisation.

``DISTSEQ_FAILPOINT=name`` (or ``name@step``) kills the process the moment it reaches that place, so
tests can prove recovery from a crash at an exact, otherwise unreachable instant (half-way through a
checkpoint write). Unset, a failpoint is one environment lookup; they sit only on cold paths.
"""

import os
import signal
from typing import Optional


def failpoint(name: str, step: Optional[int] = None) -> None:
    target = os.environ.get("DISTSEQ_FAILPOINT")
    if target and target in (name, f"{name}@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def pause_point(name: str) -> None:
    """``DISTSEQ_PAUSE=name`` stops here for a minute after printing ``distseq: paused at name``, so a
    test can send a signal at exactly this moment (e.g. during start-up). Unset, one lookup."""
    if os.environ.get("DISTSEQ_PAUSE") == name:
        import time

        print(f"distseq: paused at {name}", flush=True)
        time.sleep(60)


def slow_rank_seconds(rank: int) -> float:
    """``DISTSEQ_SLOW_RANK=R:MS`` makes rank R a straggler: it sleeps MS milliseconds in every step's own
    work (read once at start-up); 0 for every other rank and when unset."""
    return _for_rank("DISTSEQ_SLOW_RANK", rank) / 1000.0


def late_restart_seconds() -> float:
    """``DISTSEQ_LATE_RESTART=R:SECONDS``: after an in-job restart (torch elastic's TORCHELASTIC_RESTART_COUNT
    above 0), rank R joins the process group SECONDS after the others, as a machine slower to come back
    would; 0 in the first attempt, for every other rank and when unset."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return 0.0
    return _for_rank("DISTSEQ_LATE_RESTART", int(os.environ.get("RANK", "0")))


def _for_rank(variable: str, rank: int) -> float:
    """``R:AMOUNT`` in ``variable``: AMOUNT for rank R, 0 for the others and when unset."""
    target = os.environ.get(variable)
    if not target:
        return 0.0
    chosen, _, amount = target.partition(":")
    return float(amount) if int(chosen) == rank else 0.0


def strict_sync(ordinary: bool) -> None:
    """``DISTSEQ_SYNC_DEBUG=1`` on a CUDA device: torch raises on any call that makes the host wait for the
    device during an ordinary step (not a log, evaluation or checkpoint step), so a GPU run proves the step
    path free of them (``launch/gpu-check``); unset or without CUDA, one lookup."""
    if os.environ.get("DISTSEQ_SYNC_DEBUG") == "1":
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("error" if ordinary else "default")
