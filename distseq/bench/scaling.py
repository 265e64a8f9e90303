"""The scaling suite: samples/s of ``distseq train`` on 2 CPU processes against 1, in one run.

Each process gets one thread (OMP_NUM_THREADS=1) and the same per-rank micro-batch (256) of the
overhead config (LSTM hidden 256, seq 32, fp32), so perfect scaling on 2 free cores is 2.0. The two
processes are real ones started by torchrun on loopback (gloo); the world size is asserted with
--expect-world-size. Runs alternate 1, 2, 1, 2, ... and the medians are compared. CUDA is hidden
from these runs: the suite measures the CPU data-parallel path even on a GPU machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

from distseq.config import TrainConfig
from distseq.distributed.accelerator import free_port

from .overhead import overhead_config

MICRO_BATCH = 256
TIMEOUT_S = 600
STOP_GRACE_S = 60  # torchrun ends its ranks on SIGTERM and escalates to SIGKILL after its own 30 s


def run_processes(cfg: TrainConfig, world: int, timeout_s: float = TIMEOUT_S) -> Tuple[dict, float]:
    """One ``distseq train`` of ``cfg`` on ``world`` processes of one thread each, CUDA hidden: one plain
    process for 1, torchrun on loopback for more. Returns its summary and the moment (unix seconds) just
    before the launch, from which the start-up suite counts."""
    run_dir = Path(cfg.train.run_dir)
    config_file = run_dir.with_suffix(".json")
    config_file.write_text(json.dumps(cfg.to_dict()))
    launcher = [sys.executable, "-m", "distseq.cli"]
    if world > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "distseq.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launched = time.time()
    proc = subprocess.Popen([*launcher, "train", "--config", str(config_file)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # SIGTERM, not subprocess.run's SIGKILL: torchrun starts each rank in a session of its own, and only
        # torchrun itself can end them; killed outright it leaves them running
        proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        raise RuntimeError(f"{world}-process run did not end within {timeout_s:.0f} s (stopped): "
                           f"{stderr.strip()[-600:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{world}-process run failed (exit {proc.returncode}): {stderr.strip()[-600:]}")
    return json.loads((run_dir / "summary.json").read_text()), launched


def scaling_config(world: int, steps: int, run_dir: Path) -> TrainConfig:
    """The overhead config with the same micro-batch on every rank, the world size asserted."""
    cfg = overhead_config(steps, str(run_dir))
    cfg.train.global_batch_size, cfg.train.expect_world_size = MICRO_BATCH * world, world
    return cfg


def scaling_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    steps, repeats = (6, 1) if quick else (40, 3)
    rates: Dict[str, list] = {"1": [], "2": []}
    memory: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for world in (1, 2):
                result, _ = run_processes(scaling_config(world, steps, Path(tmp) / f"{world}-{repeat}"), world)
                rates[str(world)].append(result["steps_per_sec"] * result["global_batch"])
                memory[str(world)] = max(memory.get(str(world), 0.0), result["peak_rss_mb"])
            log(f"  scaling repeat {repeat + 1}/{repeats}: 1 process {rates['1'][-1]:,.0f} samples/s, "
                f"2 processes {rates['2'][-1]:,.0f} samples/s")
    one, two = statistics.median(rates["1"]), statistics.median(rates["2"])
    return {"scaling_2proc": two / one, "scaling_efficiency": two / one / 2, "samples_per_sec": {"1": one, "2": two},
            "repeats": rates, "steps": steps, "micro_batch_per_rank": MICRO_BATCH, "threads_per_process": 1,
            "backend": "gloo", "peak_rss_mb_rank0": memory}
