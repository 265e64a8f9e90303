"""The local backend: a sweep's points as processes on this machine, a pool of them at once.

Each point is ``distseq train`` (or ``distseq launch --multi_gpu --num_processes N train`` for a point of
several processes) in a session of its own, with ``OMP_NUM_THREADS`` set so the pool does not
oversubscribe the cores. A stop signal to the sweep is passed on to every running point, which saves at its
next step boundary; a point whose sweep is killed outright gets SIGTERM from the kernel (the parent-death
signal) and saves the same way, so a rerun resumes it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from distseq.distributed.accelerator import free_port
from distseq.sweep.layout import Point

POLL_S = 0.1
PR_SET_PDEATHSIG = 1


def pool_size(processes: int, threads: int) -> int:
    """Points at once: the cores this process may use over the cores one point takes (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (processes * threads))


def command(point: Point, run_dir: Path, processes: int) -> List[str]:
    """The point's command line: ``distseq train`` on one process, ``distseq launch`` on several."""
    train = ["train", *point.argv, "--run-dir", str(run_dir), "--no-progress"]
    if processes == 1:
        return [sys.executable, "-m", "distseq.cli", *train]
    return [sys.executable, "-m", "distseq.cli", "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), *train]


def _die_with_parent() -> None:
    """In the point's process before it runs: SIGTERM when the sweep dies (kill -9 included), so the point
    saves and stops instead of training on unowned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the point outlives a killed sweep
        pass


@dataclass
class Running:
    point: Point
    process: subprocess.Popen
    log: Path
    started: float


class LocalPool:
    """Runs points ``size`` at a time; ``on_start(point)`` and ``on_end(point, exit code, log, seconds)``
    report each; ``stop(signum)`` passes a stop signal on to every running point and starts no more."""

    def __init__(self, size: int, processes: int, threads: int, sweep_dir: Path, logs: Path):
        self.size, self.processes, self.threads = size, processes, threads
        self.sweep_dir, self.logs = sweep_dir, logs
        self.running: Dict[str, Running] = {}
        self.stopping: Optional[int] = None

    def stop(self, signum: int) -> None:
        self.stopping = self.stopping or signum
        for entry in self.running.values():
            try:
                entry.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def run(self, points: List[Point], on_start: Callable, on_end: Callable) -> None:
        pending = list(points)
        while pending or self.running:
            while pending and len(self.running) < self.size and self.stopping is None:
                self._start(pending.pop(0), on_start)
            for name, entry in list(self.running.items()):
                code = entry.process.poll()
                if code is not None:
                    del self.running[name]
                    on_end(entry.point, code, entry.log, time.monotonic() - entry.started)
            if self.stopping is not None and not self.running:
                return
            time.sleep(POLL_S)

    def _start(self, point: Point, on_start: Callable) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{point.name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)  # a sweep started inside a job's rank must not hand its rank to the points
        with open(log, "ab") as out:
            process = subprocess.Popen(command(point, self.sweep_dir / point.name, self.processes), stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True, preexec_fn=_die_with_parent)
        self.running[point.name] = Running(point, process, log, time.monotonic())
        on_start(point)
