"""Failpoints: named places where a test can make this process die by SIGKILL, pause it, or slow a rank.

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
    target = os.environ.get("DISTSEQ_SLOW_RANK")
    if not target:
        return 0.0
    slow, _, ms = target.partition(":")
    return float(ms) / 1000.0 if int(slow) == rank else 0.0
