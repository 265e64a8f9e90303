"""SLURM from inside a run: ask the scheduler to requeue this job after it saved on a stop signal."""

from __future__ import annotations

import os
import subprocess


def request_requeue() -> str:
    """Ask SLURM to requeue this job; returns what happened, for the log."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not under SLURM (no SLURM_JOB_ID): no requeue"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    return f"scontrol requeue {job}: " + ("ok" if result.returncode == 0 else result.stderr.strip() or "failed")
