"""Process-level setup: threads, the precision probe, the Accelerator, and rank-aware printing."""

from __future__ import annotations

import os
import signal
import subprocess
from datetime import timedelta
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from .config import Config, ConfigError
from .models import build_model
from .tasks import TASKS

TENSORBOARD_PROJECT = "tensorboard"  # event files go to RUN/tensorboard/


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


@dataclass(frozen=True)
class Precision:
    name: str  # what accelerate is given: "no", "bf16" or "fp16"
    reason: str  # one line for the operator


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _runs_under(precision: str, cfg: Config, device: torch.device) -> str:
    """One forward+backward of the configured model under autocast; '' if it works, else the error."""
    task, spec = TASKS[cfg.data.task], cfg.task_spec()
    model = build_model(cfg.model, task, spec).to(device)
    x = torch.randn(2, spec.seq_len, task.num_features(spec), device=device)  # (B, T, F)
    try:
        with torch.autocast(device.type, dtype=_DTYPES[precision]):
            loss = model(x).float().sum()
        loss.backward()
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return ""


def resolve_precision(requested: str, cfg: Config, device: torch.device) -> Precision:
    """Turn --precision into what actually runs, or raise a ConfigError; never a silent no-op."""
    alternatives = "choose --precision no"
    if requested == "no":
        return Precision("no", "fp32 as requested")
    if device.type == "cpu":
        if requested == "fp16":
            raise ConfigError("--precision", f"fp16 does not run on CPU (accelerate would ignore it); {alternatives} or bf16")
        if requested == "auto":
            return Precision("no", "auto on CPU: fp32 (CPU autocast is not reliably faster; --precision bf16 to try it)")
    if requested == "auto":
        candidates = ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]
        for candidate in candidates:
            if not _runs_under(candidate, cfg, device):
                return Precision(candidate, f"auto on {device.type}: {candidate} (probed: forward+backward works)")
        return Precision("no", f"auto on {device.type}: fp32 (no autocast precision ran {cfg.model.kind})")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision", f"bf16 is not supported by this GPU; {alternatives} or fp16")
    error = _runs_under(requested, cfg, device)
    if error:
        raise ConfigError(
            "--precision", f"{requested} fails for --model {cfg.model.kind} on {device.type} ({error}); {alternatives}"
        )
    return Precision(requested, f"{requested} as requested (probed: forward+backward works)")


def build_accelerator(cfg: Config, precision: Precision) -> Accelerator:
    # cpu=True on a machine without CUDA: otherwise accelerate leaves every launched rank training alone.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision.name,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=cfg.train.run_dir, logging_dir=cfg.train.run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))],
    )


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
