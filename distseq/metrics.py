"""What a run reports: throughput, TensorBoard scalars and hparams, the log line, summary.json."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional

from accelerate import Accelerator

from .runtime import TENSORBOARD_PROJECT


class Throughput:
    """Samples/s and ms/step over the window since the previous log step, in training time only
    (the clock leaves out evaluation and checkpoint writes)."""

    def __init__(self, step: int, samples: int, clock: "TrainingClock"):
        self.clock = clock
        self.reset(step, samples)

    def reset(self, step: int, samples: int) -> None:
        self.step, self.samples, self.time = step, samples, self.clock.train_seconds()

    def window(self, step: int, samples: int) -> Dict[str, float]:
        seconds = max(self.clock.train_seconds() - self.time, 1e-9)
        steps = max(step - self.step, 1)
        out = {
            "perf/samples_per_sec": (samples - self.samples) / seconds,
            "perf/step_time_ms": 1000.0 * seconds / steps,
        }
        self.reset(step, samples)
        return out


class TrainingClock:
    """Seconds spent training: wall time since the start, less the pauses (evaluation, checkpoint
    writes). A resumed run starts from the seconds its checkpoint recorded."""

    def __init__(self, train_before: float = 0.0, wall_before: float = 0.0):
        self.started, self.paused = time.perf_counter(), 0.0
        self.train_before, self.wall_before = train_before, wall_before

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def train_seconds(self) -> float:
        return self.train_before + time.perf_counter() - self.started - self.paused

    @contextlib.contextmanager
    def pause(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - began


def peak_memory() -> Dict[str, float]:
    """This process's peak resident memory, and peak CUDA memory when a GPU is used, in MB."""
    import resource

    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def hparams(flat_config: dict) -> dict:
    """TensorBoard hparams accept bool/int/float/str only."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat_config.items()}


def start_tracking(accelerator: Accelerator, flat_config: dict, purge_step: Optional[int] = None) -> None:
    """TensorBoard under RUN/tensorboard. On resume, ``purge_step`` hides what a killed run logged
    after its last checkpoint, so the curves continue from the checkpoint without a fold."""
    kwargs = {"tensorboard": {"purge_step": purge_step}} if purge_step else {}
    accelerator.init_trackers(TENSORBOARD_PROJECT, config=hparams(flat_config), init_kwargs=kwargs)


def log_line(step: int, max_steps: int, scalars: Dict[str, float]) -> str:
    """One grep-able ``key=value`` line: ``step=100/1500 train/loss=0.1234 ...``."""
    fields = [f"step={step}/{max_steps}"]
    for key, value in scalars.items():
        fields.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(fields)


def summary(
    *,
    step: int,
    samples: int,
    trained_samples: int,
    wall_seconds: float,
    eval_metrics: Dict[str, float],
    precision: str,
    accelerator: Accelerator,
    model: str,
    task: str,
    extra: Optional[dict] = None,
) -> dict:
    return {
        "step": step,
        "samples": samples,
        "wall_seconds": wall_seconds,
        "samples_per_sec": trained_samples / max(wall_seconds, 1e-9),
        **eval_metrics,
        "precision": precision,
        "world_size": accelerator.num_processes,
        "backend": accelerator.state.backend or "none",
        "distributed_type": str(accelerator.distributed_type.value),
        "device": str(accelerator.device),
        "model": model,
        "task": task,
        **peak_memory(),
        **(extra or {}),
    }
