"""The SLURM backend: the points to run as one job array, a task per point, each requeued on preemption.

``distseq sweep SPEC`` submits the array and returns; each task runs ``python -m distseq.sweep.task`` for
its point (``SWEEP/slurm/array.sbatch``), whose ``distseq train --requeue`` saves on SLURM's warning
signal (USR1, forwarded as SIGTERM) or a preemption, asks SLURM to requeue the task and resumes from its
checkpoint when it runs again. The sweep's state is the run dirs' as always: ``distseq sweep SPEC`` again
says where the array stands (and submits nothing while it is queued or running), ``distseq sweep report``
builds the report at any time. The spec's ``slurm:`` mapping adds sbatch options (partition, time, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

from distseq.errors import ConfigError
from distseq.fsio import write_json, write_text_atomically
from distseq.sweep.layout import point_status
from distseq.sweep.spec import Spec

ARRAY_SCRIPT = """#!/usr/bin/env bash
# One point of a distseq sweep per array task: written by `distseq sweep`, run by sbatch.
set -uo pipefail
SWEEP="$1"; LIST="$2"
NAME="$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$LIST")"
echo "distseq-sweep: task ${SLURM_ARRAY_TASK_ID} (job ${SLURM_JOB_ID}) restart ${SLURM_RESTART_COUNT:-0}: ${NAME}"
"${DISTSEQ_PYTHON:-python}" -m distseq.sweep.task "$SWEEP" "$NAME" &
CHILD=$!
forward() { echo "distseq-sweep: $1 received: asking the point to save and stop"; kill -TERM "$CHILD"; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
wait "$CHILD"; code=$?
if [ "$code" -gt 128 ] && kill -0 "$CHILD" 2>/dev/null; then
  wait "$CHILD"; code=$?  # a trapped signal interrupted the first wait: let the point finish saving
fi
exit "$code"
"""
JOBS = "jobs.json"  # SWEEP/slurm/jobs.json: {job id: [point names]} of every submission


def submit(spec: Spec, root: Path, todo: List, refused: dict) -> int:
    """Submit ``todo`` (the points to run, the refused ones already recorded failed) as one array."""
    if not shutil.which("sbatch"):
        raise ConfigError("backend", "slurm: sbatch is not on PATH (run the sweep on a SLURM login node, or use "
                                     "backend: local)")
    slurm = root / "slurm"
    slurm.mkdir(exist_ok=True)
    jobs = _jobs(slurm)
    active = queued(list(jobs))
    if active:
        print(f"sweep: job array {', '.join(active)} is still queued or running: nothing submitted "
              f"({_counts(spec, root)}); `distseq sweep report {root}` reports at any time", flush=True)
        return 0
    todo = [p for p in todo if p.name not in refused]
    if not todo:
        print(f"sweep: nothing to submit ({_counts(spec, root)})", flush=True)
        return 1 if refused else 0
    listing = slurm / f"points-{len(jobs)}.txt"
    write_text_atomically(listing, "".join(f"{p.name}\n" for p in todo))
    script = slurm / "array.sbatch"
    write_text_atomically(script, ARRAY_SCRIPT)
    cmd = ["sbatch", "--parsable", f"--array=0-{len(todo) - 1}", "--job-name=distseq-sweep", "--requeue",
           "--signal=B:USR1@180", "--open-mode=append", f"--output={root / 'logs'}/%A_%a.out",
           f"--chdir={os.getcwd()}", *(f"--{key}={value}" for key, value in spec.slurm.items()),
           str(script), str(root.resolve()), str(listing.resolve())]
    (root / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "DISTSEQ_PYTHON": sys.executable, "OMP_NUM_THREADS": str(spec.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise ConfigError("backend", f"slurm: sbatch refused the array: {done.stderr.strip().splitlines()[-1:]}")
    job = done.stdout.strip().split(";")[0]
    write_json(slurm / JOBS, {**jobs, job: [p.name for p in todo]})
    print(f"sweep: submitted job array {job}: {len(todo)} point(s), a task each (logs in {root / 'logs'}); "
          f"`distseq sweep {spec.path}` again says where it stands", flush=True)
    return 1 if refused else 0


def queued(jobs: List[str]) -> List[str]:
    """The submitted arrays that SLURM still holds (pending, running or requeued)."""
    if not jobs:
        return []
    listed = subprocess.run(["squeue", "-h", "-o", "%F", "-j", ",".join(jobs)], capture_output=True, text=True)
    return sorted(set(listed.stdout.split()) & set(jobs))


def _jobs(slurm: Path) -> dict:
    try:
        return json.loads((slurm / JOBS).read_text())
    except (OSError, ValueError):
        return {}


def _counts(spec: Spec, root: Path) -> str:
    states = [point_status(root / p.name)[0] for p in spec.points]
    return ", ".join(f"{states.count(s)} {s}" for s in ("complete", "interrupted", "failed", "pending")
                     if states.count(s))
