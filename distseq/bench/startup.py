"""The start-up suite: seconds from launching ``distseq train`` to the end of its first optimizer step, on
1, 2, 4 and 8 processes (1 and 2 with --quick), and where they go.

A job on many ranks pays its start-up on every launch and every requeue, and a phase that grows with the
rank count (the imports of ranks competing for the cores, the rendezvous waiting for the slowest) is what
to fix before scaling out. The clock starts just before the launcher (one plain process for 1, torchrun
for more) and stops at the ``first_step_done_unix`` the main process writes into summary.json
(``distseq/startup.py``), so the launcher's own start is counted: ``launcher_seconds`` is the part before
the main process began, and ``phases_seconds`` its own timeline from there. Every process has one thread
and the same micro-batch of a tiny LSTM, CUDA hidden, so the figure is the harness's start-up and not the
model's. On a machine with fewer cores than processes the ranks share the cores, as they do on a
crowded node.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

from distseq.config import TrainConfig, preset

from .scaling import run_processes

PROCESS_COUNTS = (1, 2, 4, 8)
QUICK_PROCESS_COUNTS = (1, 2)  # 8 ranks importing torch on 2 cores alone take about 30 s; the plumbing needs 2
MICRO_BATCH = 32  # per rank, on every count: the first step does the same work on each rank
LAUNCH_TIMEOUT_S = 240  # a one-step run of 8 ranks takes under a minute even on 2 busy cores
# the order of loop.build_run (summary.json sorts its keys); a phase not named here goes last
PHASE_ORDER = ("imports", "data_index", "model", "precision_probe", "rendezvous", "run_dir_and_optimizer",
               "resume", "data_pipeline", "first_step")


def startup_config(world: int, run_dir: Path) -> TrainConfig:
    """The default preset shrunk to one step: the smallest run that still builds everything a real one does."""
    cfg = preset("default")
    cfg.model.hidden_size = 16
    cfg.data.eval_size = 64
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.run_dir = 1, 0, str(run_dir)
    cfg.train.global_batch_size, cfg.train.expect_world_size = MICRO_BATCH * world, world
    cfg.checkpoint.checkpoint_every, cfg.checkpoint.resume = 0, "never"
    cfg.log.progress = False
    return cfg


def in_timeline_order(phases: Dict[str, float]) -> Dict[str, float]:
    """The phases in the order a run goes through them (JSON files sort their keys)."""
    known = [name for name in PHASE_ORDER if name in phases]
    return {name: phases[name] for name in known + sorted(set(phases) - set(known))}


def measure(world: int, run_dir: Path) -> Dict:
    """One launch: its start-up seconds, the launcher's share and the main process's phases."""
    summary, launched = run_processes(startup_config(world, run_dir), world, LAUNCH_TIMEOUT_S)
    startup = summary["startup"]
    return {"startup_seconds": startup["first_step_done_unix"] - launched,
            "launcher_seconds": startup["process_start_unix"] - launched,
            "phases_seconds": in_timeline_order(startup["phases_seconds"])}


def median_run(runs: List[Dict]) -> Dict:
    """The run whose start-up is the median: its phases and launcher seconds add up to its figure, which
    medians taken phase by phase would not."""
    ordered = sorted(runs, key=lambda run: run["startup_seconds"])
    return ordered[(len(ordered) - 1) // 2]


def startup_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    counts, repeats = (QUICK_PROCESS_COUNTS, 1) if quick else (PROCESS_COUNTS, 3)
    runs: Dict[str, List[Dict]] = {str(world): [] for world in counts}
    with tempfile.TemporaryDirectory() as tmp:
        # untimed: the first launch after a while reads torch from disk and would charge that to 1 process
        # (--quick skips it: its figures are a smoke test of the plumbing, not worth one launch more)
        if not quick:
            measure(1, Path(tmp) / "warm-up")
        for repeat in range(repeats):
            for world in counts:  # alternating, so the machine's drift falls on every count
                run = measure(world, Path(tmp) / f"{world}-{repeat}")
                runs[str(world)].append(run)
                phases = ", ".join(f"{name} {seconds:.2f}" for name, seconds in run["phases_seconds"].items())
                log(f"  startup repeat {repeat + 1}/{repeats}, {world} process{'es' if world > 1 else ''}: "
                    f"{run['startup_seconds']:.2f} s (launcher {run['launcher_seconds']:.2f}; {phases})")
    chosen = {world: median_run(world_runs) for world, world_runs in runs.items()}
    first, last = str(counts[0]), str(counts[-1])
    growth = {name: seconds - chosen[first]["phases_seconds"].get(name, 0.0)
              for name, seconds in chosen[last]["phases_seconds"].items()}
    return {
        "startup_seconds": {world: run["startup_seconds"] for world, run in chosen.items()},
        "phases_seconds": {world: run["phases_seconds"] for world, run in chosen.items()},
        "launcher_seconds": {world: run["launcher_seconds"] for world, run in chosen.items()},
        "growth": chosen[last]["startup_seconds"] / chosen[first]["startup_seconds"],
        "phase_growth_seconds": growth,
        "largest_growing_phase": max(growth, key=growth.get),
        "launcher_growth_seconds": chosen[last]["launcher_seconds"] - chosen[first]["launcher_seconds"],
        "repeats_seconds": {world: [run["startup_seconds"] for run in each] for world, each in runs.items()},
        "processes": list(counts),
        "cpu_count": os.cpu_count(),
        "threads_per_process": 1,
        "micro_batch_per_rank": MICRO_BATCH,
        "repeats": repeats,
    }
