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
    """Samples/s and ms/step over the window since the previous log step."""

    def __init__(self, step: int, samples: int):
        self.reset(step, samples)

    def reset(self, step: int, samples: int) -> None:
        self.step, self.samples, self.time = step, samples, time.perf_counter()

    def window(self, step: int, samples: int) -> Dict[str, float]:
        seconds = max(time.perf_counter() - self.time, 1e-9)
        steps = max(step - self.step, 1)
        out = {
            "perf/samples_per_sec": (samples - self.samples) / seconds,
            "perf/step_time_ms": 1000.0 * seconds / steps,
        }
        self.reset(step, samples)
        return out


class TrainingClock:
    """Seconds spent training: wall time since the start, less the pauses (evaluation, checkpoint writes)."""

    def __init__(self):
        self.started, self.paused = time.perf_counter(), 0.0

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started

    def train_seconds(self) -> float:
        return self.wall_seconds() - self.paused

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


def write_text_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, payload: dict) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


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
