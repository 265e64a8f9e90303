"""Process-level setup: threads, the precision probe, the Accelerator, and rank-aware printing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from datetime import timedelta
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from .config import TrainConfig, ConfigError
from .precision import Precision

TENSORBOARD_PROJECT = "tensorboard"  # event files go to RUN/tensorboard/


def free_port() -> int:
    """A TCP port free on loopback now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def set_cpu_threads() -> None:
    """Give each of N local CPU processes 1/N of the cores unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_accelerator(cfg: TrainConfig, precision: Precision) -> Accelerator:
    # cpu=True on a machine without CUDA: otherwise accelerate leaves every launched rank training alone.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision.name,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=cfg.train.run_dir, logging_dir=cfg.train.run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))],
    )


def check_world_size(accelerator: Accelerator, expected: Optional[int]) -> None:
    """Fail when the launch produced another number of processes than asked for.

    Two silent failures are caught: a launcher's WORLD_SIZE that the Accelerator did not join (ranks
    training alone), and --expect-world-size N (say, from a config asking for N) against what started.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    got = accelerator.num_processes
    if launched != got:
        raise ConfigError("--expect-world-size", f"the launcher started {launched} processes but they joined "
                                                 f"{got} group(s) of {got}: every rank would train alone")
    if expected is not None and got != expected:
        hint = (" (on a CPU machine, `accelerate launch --cpu --num_processes N` and `distributed_type: MULTI_CPU` "
                "start one process: use --multi_gpu, see accelerate_configs/cpu_2proc.yaml)"
                if accelerator.device.type == "cpu" else "")
        raise ConfigError("--expect-world-size", f"asked for {expected} processes, the launch produced {got}{hint}")


def print0(accelerator: Accelerator, *args) -> None:
    """print on the main process only (to the sys.stdout of the moment, which notebooks and tests swap)."""
    if accelerator.is_main_process:
        print(*args, flush=True)


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop acts on it at the next step boundary, on every rank together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = 0  # the signal number, 0 while none arrived
        self._previous = {}

    def __enter__(self) -> "Preemption":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum


def request_requeue() -> str:
    """Ask SLURM to requeue this job; returns what happened, for the log."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not under SLURM (no SLURM_JOB_ID): no requeue"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    return f"scontrol requeue {job}: " + ("ok" if result.returncode == 0 else result.stderr.strip() or "failed")


_COLLECTIVE_FAILURES = ("gloo", "NCCL", "nccl", "Connection reset", "Connection closed", "timed out", "Timed out")


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because a peer died or hung past --dist-timeout-s (not a bug of ours).
    DDP's reducer reports these as a plain RuntimeError carrying the backend's message."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(marker in str(error) for marker in _COLLECTIVE_FAILURES)
    )
