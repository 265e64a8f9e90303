"""``python -m distseq.sweep.task SWEEP_DIR NAME``: one point of a sweep, as a SLURM array task runs it.

The point's ``distseq train`` (with ``--requeue``: a preempted task saves, asks SLURM to requeue it and
resumes when it runs again) runs as a child; its output passes through, and how it ended is recorded in
its run dir as the local backend records it (a failure's one line in ``sweep-failed.json``). The stop
signals the batch script forwards are passed on to the child, which saves at its next step boundary.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from distseq.sweep.layout import points_of, read_manifest
from distseq.sweep.local import command
from distseq.sweep.runner import classify, passed_on


def run_task(sweep_dir: Path, name: str) -> int:
    manifest = read_manifest(sweep_dir)
    point = next(p for p in points_of(manifest) if p.name == name)
    cmd = [*command(point, sweep_dir / name, manifest["identity"]["processes"]), "--requeue"]
    env = {**os.environ, "OMP_NUM_THREADS": str(manifest["identity"]["threads"]), "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    last = ""
    with passed_on(child.send_signal):
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            last = line.strip() or last
        code = child.wait()
    status, reason = classify(sweep_dir / name, code, last)
    print(f"distseq-sweep: {name}: {status}" + (f": {reason}" if reason else "") + f" (exit {code})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(run_task(Path(sys.argv[1]), sys.argv[2]))
