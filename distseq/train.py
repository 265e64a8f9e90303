"""The training loop: the one place that knows the order of a step.

Counted in optimizer steps. Each step consumes ``grad_accum_steps`` micro-batches per rank inside
``accelerator.accumulate``; losses and accuracies stay on the device and are reduced across ranks
only on log steps (the only place ``.item()`` is called).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from .accounting import DataAccountingError, Digest
from .checkpoint import save_checkpoint
from .config import Config, OptimConfig
from .data import Layout, SampleSource, eval_batches, micro_batches, train_loader
from .files import DataFileError, FileStream, resolve_files
from .metrics import Throughput, log_line, start_tracking, summary, write_json
from .models import build_model
from .runtime import build_accelerator, local_device, print0, resolve_precision, set_cpu_threads
from .tasks import TASKS, Batch, Task

EVAL_BATCH = 1024  # held-out samples per forward pass


def lr_factor(cfg: OptimConfig, max_steps: int):
    """Linear warmup to 1, then constant or cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def forward(model, batch: Batch, device: torch.device, variable_length: bool) -> torch.Tensor:
    x = batch["x"].to(device, non_blocking=True)  # (b, T, F)
    return model(x, batch["lengths"] if variable_length else None)  # lengths stay on the CPU for packing


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, task: Task, batches: List[Batch], eval_size: int,
             variable_length: bool) -> Dict[str, float]:
    """Held-out loss and accuracy over exactly ``eval_size`` samples, whatever the world size."""
    model = accelerator.unwrap_model(model)
    model.eval()
    losses, correct = [], []
    for batch in batches:
        with accelerator.autocast():
            logits = forward(model, batch, accelerator.device, variable_length)
        y = batch["y"].to(accelerator.device)
        per_sample = torch.stack([task.loss(logits, y), task.correct(logits, y)], 1)  # (n, 2)
        keep = accelerator.gather_for_metrics(batch["index"].to(accelerator.device)) >= 0  # padding rows are -1
        gathered = accelerator.gather_for_metrics(per_sample)[keep]  # (valid, 2)
        losses.append(gathered[:, 0])
        correct.append(gathered[:, 1])
    model.train()
    loss, correct = torch.cat(losses), torch.cat(correct)
    if loss.numel() != eval_size:
        raise DataAccountingError(f"evaluation saw {loss.numel()} samples, expected {eval_size}")
    return {"eval/loss": loss.mean().item(), "eval/accuracy": correct.mean().item()}


def verify_digest(accelerator: Accelerator, window: Digest, start: int, stop: int) -> List[Digest]:
    """All ranks' digests of the window; the main process checks their union is ``[start, stop)``."""
    per_rank = accelerator.gather(window.as_tensor().to(accelerator.device)).reshape(-1, 3).cpu()
    digests = [Digest.from_tensor(row) for row in per_rank]
    verdict = [""]
    if accelerator.is_main_process:
        union = Digest()
        for digest in digests:
            union = union.merge(digest)
        expected = Digest.of_range(start, stop)
        if union != expected:
            verdict[0] = f"data accounting failed for samples [{start}, {stop}): got {union}, expected {expected}"
    broadcast_object_list(verdict)
    if verdict[0]:
        raise DataAccountingError(verdict[0])
    return digests


@dataclass
class Accounting:
    """--verify-data: the digest of the current window and of everything checked so far, per rank."""

    checked_until: int  # stream position up to which every sample has been verified
    world_size: int
    window: Digest = field(default_factory=Digest)
    per_rank: List[Digest] = field(default_factory=list)

    def check(self, accelerator: Accelerator, until: int) -> None:
        digests = verify_digest(accelerator, self.window, self.checked_until, until)
        self.per_rank = [a.merge(b) for a, b in zip(self.per_rank or [Digest()] * self.world_size, digests)]
        self.checked_until, self.window = until, Digest()

    def report(self) -> dict:
        return {"checked_until": self.checked_until, "per_rank": [vars(d) for d in self.per_rank]}


@dataclass
class WindowSums:
    """Per-log-window sums kept on the device; read (one sync) and reset only on log steps."""

    loss: torch.Tensor
    correct: torch.Tensor
    grad_norm: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> "WindowSums":
        return cls(*(torch.zeros((), device=device) for _ in range(3)))


class SyntheticFeed:
    """The synthetic stream: always a full step, for exactly the configured steps (invariant 5)."""

    def __init__(self, batches: Iterator[Batch], grad_accum: int):
        self.batches, self.grad_accum = batches, grad_accum

    def next_step(self) -> Optional[List[Batch]]:
        return [next(self.batches) for _ in range(self.grad_accum)]


class FileFeed:
    """Finite files: every step, all ranks agree (one all-reduce) whether each still has a full step."""

    CONTINUE, EXHAUSTED, FAILED = 0, 1, 2

    def __init__(self, stream: FileStream, grad_accum: int, accelerator: Accelerator):
        self.stream, self.grad_accum, self.accelerator = stream, grad_accum, accelerator

    def next_step(self) -> Optional[List[Batch]]:
        status, error, step = self.CONTINUE, None, []
        try:
            while status == self.CONTINUE and len(step) < self.grad_accum:
                batch = self.stream.next_micro_batch()
                if batch is None:
                    status = self.EXHAUSTED
                else:
                    step.append(batch)
        except DataFileError as failure:
            status, error = self.FAILED, failure
        flag = torch.tensor(status, device=self.accelerator.device)
        agreed = int(self.accelerator.reduce(flag, "max"))
        if agreed == self.FAILED:
            raise error or DataFileError("another process could not read its data files (its message names the row)")
        return step if agreed == self.CONTINUE else None


def train(cfg: Config) -> dict:
    """Train as configured; returns the summary (on every rank; only the main process writes it)."""
    set_cpu_threads()
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    precision = resolve_precision(cfg.train.precision, cfg, local_device())
    accelerator = build_accelerator(cfg, precision)
    cfg.validate(accelerator.num_processes)
    d, t = cfg.data, cfg.train
    run_dir, device, rank, world = Path(t.run_dir), accelerator.device, accelerator.process_index, accelerator.num_processes
    task, spec = TASKS[d.task], cfg.task_spec()
    layout = Layout(cfg.micro_batch_size(world), world, t.grad_accum_steps)

    torch.manual_seed(t.seed)
    model = build_model(cfg.model, task, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, t.max_steps))
    for _ in range(t.start_step):  # the schedule is a pure function of the step; catch up without training
        scheduler.step()
    model, optimizer = accelerator.prepare(model, optimizer)  # the DataLoader is never prepared (DESIGN inv. 4)

    eval_set = eval_batches(SampleSource(d.task, spec, t.seed, d.block_size, "eval"), rank, world, d.eval_size, EVAL_BATCH)
    if d.data_files:
        stream = FileStream(resolve_files(d.data_files), d.sequence_column, d.label_column, task, spec, rank, world,
                            layout.micro_batch)
        feed = FileFeed(stream, layout.grad_accum, accelerator)
    else:
        source = SampleSource(d.task, spec, t.seed, d.block_size, "train", d.dataset_size)
        loader = train_loader(source, layout, rank, t.start_step, t.max_steps - t.start_step, d.samples_per_example,
                              d.num_workers, pin_memory=device.type == "cuda")
        feed = SyntheticFeed(micro_batches(loader, layout.micro_batch), layout.grad_accum)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.to_dict())
    start_tracking(accelerator, cfg.flat())
    print0(
        accelerator,
        f"distseq: world_size={world} backend={accelerator.state.backend or 'none'} device={device} "
        f"precision={precision.name} ({precision.reason}) micro_batch={layout.micro_batch} "
        f"grad_accum={layout.grad_accum} global_batch={layout.global_batch} run_dir={run_dir}",
    )

    sums = WindowSums.zeros(device)
    accounting = Accounting(t.start_step * layout.global_batch, world) if t.verify_data else None
    eval_metrics: Dict[str, float] = {}
    meter = Throughput(t.start_step, t.start_step * layout.global_batch)
    bar = tqdm(total=t.max_steps, initial=t.start_step, desc="train",
               disable=not (accelerator.is_main_process and cfg.log.progress))
    started = time.perf_counter()

    def log(done: int) -> None:
        nonlocal sums
        totals = accelerator.reduce(torch.stack([sums.loss, sums.correct]), "sum").tolist()
        window_samples = (done - meter.step) * layout.global_batch
        scalars = {
            "train/loss": totals[0] / window_samples,
            "train/accuracy": totals[1] / window_samples,
            "train/lr": scheduler.get_last_lr()[0],
            "train/grad_norm": float(sums.grad_norm),
            **meter.window(done, done * layout.global_batch),
        }
        sums = WindowSums.zeros(device)
        accelerator.log(scalars, step=done)
        if accelerator.is_main_process:
            bar.write(log_line(done, t.max_steps, scalars))

    def evaluate_and_log(done: int) -> Dict[str, float]:
        metrics = evaluate(accelerator, model, task, eval_set, d.eval_size, spec.variable)
        accelerator.log(metrics, step=done)
        if accelerator.is_main_process:
            bar.write(log_line(done, t.max_steps, metrics))
        return metrics

    def save(done: int) -> Path:
        return save_checkpoint(accelerator, model, optimizer, scheduler, step=done,
                               samples=done * layout.global_batch, config=cfg.to_dict())

    done = t.start_step
    for step in range(t.start_step, t.max_steps):
        micro = feed.next_step()
        if micro is None:  # every rank agreed the data files are used up
            break
        done = step + 1
        is_log_step = done % cfg.log.log_every == 0 or done == t.max_steps
        is_eval_step = done == t.max_steps or (t.eval_every and done % t.eval_every == 0)
        for batch in micro:
            if accounting:
                accounting.window.add(batch["index"])
            y = batch["y"].to(device, non_blocking=True)
            with accelerator.accumulate(model):
                logits = forward(model, batch, device, spec.variable)
                losses = task.loss(logits, y)  # (b,)
                accelerator.backward(losses.mean())
                if accelerator.sync_gradients and (cfg.optim.grad_clip > 0 or is_log_step):
                    sums.grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums.loss += losses.detach().sum()
            sums.correct += task.correct(logits.detach(), y).sum()
        scheduler.step()
        bar.update(1)

        if accounting and (is_log_step or is_eval_step):
            accounting.check(accelerator, done * layout.global_batch)
        if is_log_step:
            log(done)
        if is_eval_step:
            eval_metrics = evaluate_and_log(done)
        if done == t.max_steps or (cfg.checkpoint.checkpoint_every and done % cfg.checkpoint.checkpoint_every == 0):
            checkpoint = save(done)
    bar.close()

    if done == t.start_step:
        raise DataFileError(f"--data-files hold fewer rows than one global batch ({layout.global_batch}) per step")
    if done < t.max_steps:  # the files ran out first: close the run at the last complete step
        print0(accelerator, f"distseq: data files used up after step {done}")
        if meter.step < done:
            log(done)
        eval_metrics = evaluate_and_log(done)
        checkpoint = save(done)

    extra = {"checkpoint": str(checkpoint), "micro_batch": layout.micro_batch, "global_batch": layout.global_batch,
             "start_step": t.start_step}
    if accounting:
        extra["data_accounting"] = accounting.report()
    result = summary(
        step=done, samples=done * layout.global_batch,
        trained_samples=(done - t.start_step) * layout.global_batch, wall_seconds=time.perf_counter() - started,
        eval_metrics=eval_metrics, precision=precision.name, accelerator=accelerator, model=cfg.model.kind,
        task=d.task, extra=extra,
    )
    accelerator.end_training()
    if accelerator.is_main_process:
        write_json(run_dir / "summary.json", result)
        print(
            f"distseq: done: step={result['step']} eval/accuracy={eval_metrics['eval/accuracy']:.4f} "
            f"samples/s={result['samples_per_sec']:.0f}\n"
            f"  summary     {run_dir / 'summary.json'}\n"
            f"  checkpoint  {checkpoint}\n"
            f"  tensorboard tensorboard --logdir {run_dir / 'tensorboard'}",
            flush=True,
        )
    return result
