"""What a run reports: throughput, TensorBoard scalars and hparams, the log line, summary.json."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from distseq.config import LogConfig
from distseq.distributed.accelerator import show_progress
from distseq.models.flops import peak_flops
from distseq.ops.stragglers import RankTimes


@dataclass
class Window:
    """What happened since the last log step. Loss and correct-count sums stay on the device (read
    with one sync on log steps); they cover applied steps only, never a skipped one (masked on the
    device by the agreed flag, so no step waits to learn it)."""

    loss: torch.Tensor
    correct: torch.Tensor
    solved: torch.Tensor  # samples with every answer right (per-step heads)
    grad_norm: torch.Tensor  # of the newest applied step (NaN before any)
    steps: int = 0
    skipped: int = 0  # counted by the loop as it reads the agreed flags (every one is read by a log step)

    @classmethod
    def empty(cls, device: torch.device) -> "Window":
        return cls(*(torch.zeros((), device=device) for _ in range(3)), torch.full((), math.nan, device=device))

    @property
    def applied(self) -> int:
        return self.steps - self.skipped


class StepLogger:
    """The log step: when it comes (every --log-every steps and the last), what it reports (averages
    over applied steps only, skipped steps, lr, grad norm, throughput in training time) and where (one
    plain line on the main process, or above the progress bar; the trackers through accelerate).

    It also counts the tokens (time steps of the samples, padding excluded) every rank trained on;
    ``flush_tokens`` sums them over ranks, at log steps and before a checkpoint saves the total. At
    log steps it compares the ranks' own work per step (``ranks``, stragglers.py)."""

    def __init__(self, cfg: LogConfig, *, accelerator: Accelerator, max_steps: int, global_batch: int, start: int,
                 clock: "TrainingClock", flops_per_token: float, per_step: bool, tokens_before: int = 0):
        self.accelerator, self.every, self.max_steps, self.global_batch = accelerator, cfg.log_every, max_steps, \
            global_batch
        self.per_step = per_step  # per-step heads also report the fraction of samples with every answer right
        self.window = Window.empty(accelerator.device)
        self.ranks = RankTimes(accelerator, cfg.straggler_factor)
        self.tokens_total, self.tokens_pending = tokens_before, 0  # all ranks' tokens; this rank's since the last sum
        self.meter = Throughput(start, start * global_batch, tokens_before, clock, flops_per_token,
                                peak_flops(accelerator.device), accelerator.num_processes)
        self.bar = tqdm(total=max_steps, initial=start, desc="train",
                        disable=not (accelerator.is_main_process and show_progress(cfg.progress)))

    def record(self, loss: torch.Tensor, correct: torch.Tensor, solved: torch.Tensor, tokens: int,
               grad_norm: torch.Tensor, skipped: torch.Tensor) -> None:
        """One step; ``skipped`` () 1.0 where the step was left out (its figures are then not added)."""
        self.bar.update(1)
        self.tokens_pending += tokens  # a skipped step's forward and backward ran all the same
        window, applied = self.window, skipped == 0
        window.loss += torch.where(applied, loss, 0.0)  # a skipped step's loss may be NaN: never added
        window.correct += torch.where(applied, correct, 0.0)
        window.solved += torch.where(applied, solved, 0.0)
        window.grad_norm = torch.where(applied, grad_norm.float(), window.grad_norm)
        window.steps += 1

    def due(self, done: int) -> bool:
        return done % self.every == 0 or done == self.max_steps

    def flush_tokens(self) -> int:
        """Add every rank's tokens since the last call to the total (one all-reduce); the total."""
        pending = torch.tensor(float(self.tokens_pending), dtype=torch.float64, device=self.accelerator.device)
        self.tokens_total += int(self.accelerator.reduce(pending, "sum").item())
        self.tokens_pending = 0
        return self.tokens_total

    def log(self, done: int, lr: float, skipped_total: int) -> None:
        window, scalars = self.window, {}
        # one all-reduce: the window's sums (applied steps) and the tokens (every step); float64 counts exactly
        sums = torch.stack([window.loss, window.correct, window.solved]).double()
        pending = torch.tensor([float(self.tokens_pending)], dtype=torch.float64, device=sums.device)
        totals = self.accelerator.reduce(torch.cat([sums, pending]), "sum").tolist()
        self.tokens_total += int(totals[3])
        self.tokens_pending = 0
        if window.applied:
            samples = window.applied * self.global_batch
            scalars.update({"train/loss": totals[0] / samples, "train/accuracy": totals[1] / samples})
            if self.per_step:
                scalars["train/sequence_accuracy"] = totals[2] / samples
        scalars["train/lr"] = lr
        if window.applied:
            scalars["train/grad_norm"] = float(window.grad_norm)
        scalars["train/skipped_steps"] = skipped_total
        scalars["train/skipped_steps_window"] = window.skipped
        scalars.update(self.meter.window(done, done * self.global_batch, self.tokens_total))
        rank_scalars, straggler = self.ranks.gather(scalars["perf/step_time_ms"])
        scalars.update(rank_scalars)
        self.window = Window.empty(self.accelerator.device)
        self.accelerator.log(scalars, step=done)
        self.emit(log_line(done, self.max_steps, {k: v for k, v in scalars.items() if shown(k, v)})
                  + (f" | {straggler}" if straggler else ""))

    @property
    def pending(self) -> bool:
        """Steps since the last log line."""
        return self.window.steps > 0

    def emit(self, line: str) -> None:
        """One line from the main process, above the bar when there is one."""
        if self.accelerator.is_main_process:
            self.bar.write(line) if not self.bar.disable else print(line, flush=True)

    def close(self) -> None:
        self.bar.close()


class Throughput:
    """Samples/s, tokens/s, model FLOP/s (and MFU where the device's peak is known) and ms/step over the
    window since the previous log step, in training time only (the clock leaves out evaluation and
    checkpoint writes)."""

    def __init__(self, step: int, samples: int, tokens: int, clock: "TrainingClock", flops_per_token: float,
                 peak: Optional[float] = None, devices: int = 1):
        self.clock, self.flops_per_token, self.peak, self.devices = clock, flops_per_token, peak, devices
        self.reset(step, samples, tokens)

    def reset(self, step: int, samples: int, tokens: int) -> None:
        self.step, self.samples, self.tokens, self.time = step, samples, tokens, self.clock.train_seconds()

    def window(self, step: int, samples: int, tokens: int) -> Dict[str, float]:
        seconds = max(self.clock.train_seconds() - self.time, 1e-9)
        steps = max(step - self.step, 1)
        out = {
            "perf/samples_per_sec": (samples - self.samples) / seconds,
            "perf/tokens_per_sec": (tokens - self.tokens) / seconds,
            "perf/model_flops_per_sec": (tokens - self.tokens) * self.flops_per_token / seconds,
            "perf/step_time_ms": 1000.0 * seconds / steps,
        }
        if self.peak:
            out["perf/mfu"] = out["perf/model_flops_per_sec"] / (self.peak * self.devices)
        self.reset(step, samples, tokens)
        return out


class TrainingClock:
    """Seconds spent training: wall time since ``begin_training`` (the first step), less the pauses
    (evaluation, checkpoint writes); set-up before the first step is wall time only. A resumed run
    starts from the seconds its checkpoint recorded."""

    def __init__(self, train_before: float = 0.0, wall_before: float = 0.0):
        self.started, self.paused, self.training_from = time.perf_counter(), 0.0, None
        self.train_before, self.wall_before = train_before, wall_before

    def begin_training(self) -> None:
        self.training_from = time.perf_counter()

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def train_seconds(self) -> float:
        if self.training_from is None:
            return self.train_before
        return self.train_before + time.perf_counter() - self.training_from - self.paused

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


# The log line is for people: loss, accuracy, lr, grad norm and throughput. Everything is in TensorBoard and
# summary.json; the line leaves out what rarely says anything (each rank's own timing, which the straggler note
# states when it matters; model FLOP/s) and the skipped-step counts while they are 0.
HIDDEN = ("perf/step_time_ms_min", "perf/step_time_ms_max", "perf/slowest_rank", "perf/model_flops_per_sec")
SHOWN_WHEN_NONZERO = ("train/skipped_steps", "train/skipped_steps_window")


def shown(key: str, value) -> bool:
    """Whether a scalar appears in the log line."""
    return key not in HIDDEN and not (key in SHOWN_WHEN_NONZERO and not value)


def log_line(step: int, max_steps: int, scalars: Dict[str, float]) -> str:
    """One grep-able ``key=value`` line: ``step=100/1500 train/loss=0.1234 ...``."""
    fields = [f"step={step}/{max_steps}"]
    for key, value in scalars.items():
        fields.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(fields)


def throughput(trained_samples: int, trained_tokens: int, train_seconds: float, flops_per_token: float,
               device: torch.device, devices: int) -> dict:
    """The run's throughput over its training time (evaluation and checkpoint writes left out), as the
    perf/ scalars count it: samples/s, tokens/s, model FLOP/s, and MFU where the GPU's peak is known."""
    seconds = max(train_seconds, 1e-9)
    flops = trained_tokens * flops_per_token / seconds
    peak = peak_flops(device)
    return {
        "samples_per_sec": trained_samples / seconds,
        "tokens": trained_tokens,
        "tokens_per_sec": trained_tokens / seconds,
        "flops_per_token": flops_per_token,
        "model_flops_per_sec": flops,
        "mfu": flops / (peak * devices) if peak else "unknown",
        "peak_flops_per_device": peak,
    }


def summary(
    *,
    step: int,
    samples: int,
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
