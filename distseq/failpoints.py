"""Failpoints: named places where a crash test can make this process die by SIGKILL.

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
