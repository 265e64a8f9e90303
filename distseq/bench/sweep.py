"""The sweep suite: what ``distseq sweep`` costs beyond the runs it starts, and what its pool gains.

The same tiny points (one thread each) run three ways, on this machine, in one process each: as plain
``distseq train`` commands one after another (the reference), as a sweep of pool 1, and as a sweep of
pool 2. ``sweep_overhead_s_per_point`` is (pool 1 - reference) / points: the runner's own start, checks,
bookkeeping and report, spread over the points; ``sweep_pool_ratio`` is pool-1 time / pool-2 time, the
points per hour that a pool of two one-thread runs gains on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import yaml

POINTS, QUICK_POINTS = 8, 2
OPTIONS = {"seq-len": 10, "hidden-size": 16, "global-batch-size": 32, "max-steps": 20, "eval-every": 0,
           "eval-size": 64, "log-with": "none", "precision": "no", "checkpoint-every": 0}


def _timed(command) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=_env())
    return time.perf_counter() - started


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def sweep_suite(quick: bool = False, log: Callable[[str], None] = print) -> Dict:
    from distseq.sweep.spec import load_spec

    count = QUICK_POINTS if quick else POINTS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = root / "bench.yaml"
        spec.write_text(yaml.safe_dump({"base": {"options": OPTIONS}, "grid": {"seed": list(range(count))}}))
        points = load_spec(spec).points
        reference = sum(_timed([sys.executable, "-m", "distseq.cli", "train", *p.argv, "--run-dir",
                                str(root / "alone" / p.name), "--no-progress"]) for p in points)
        log(f"  {count} points one after another as plain distseq train: {reference:.1f} s")
        seconds = {}
        for pool in (1, 2):
            seconds[pool] = _timed([sys.executable, "-m", "distseq.cli", "sweep", str(spec), "--dir",
                                    str(root / f"pool{pool}"), "--pool", str(pool)])
            log(f"  the same points as a sweep of pool {pool}: {seconds[pool]:.1f} s")
    return {"points": count, "reference_seconds": reference, "pool1_seconds": seconds[1],
            "pool2_seconds": seconds[2], "sweep_overhead_s_per_point": (seconds[1] - reference) / count,
            "sweep_pool_ratio": seconds[1] / seconds[2]}
