"""The training loop: the one place that knows the order of a step.

Counted in optimizer steps. Each step consumes ``grad_accum_steps`` micro-batches per rank inside
``accelerator.accumulate``; losses and accuracies stay on the device and are reduced across ranks
only on log steps. The one read every step is two flags all ranks agree on (a non-finite loss or
gradient, a preemption signal), so every rank takes the same branch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .accounting import Accounting
from .checkpoint import CheckpointError, check_compatible, load_checkpoint, read_meta, save_checkpoint, select_checkpoint
from .config import TrainConfig, ConfigError, OptimConfig
from .data import Layout, SampleSource, SyntheticFeed, eval_batches, micro_batches, train_loader
from .evaluation import EVAL_BATCH, evaluate, forward
from .files import DataFileError, FileFeed, FileStream, resolve_files
from .metrics import Throughput, TrainingClock, log_line, start_tracking, summary, write_json
from .models import build_model
from .profiling import StepProfiler, format_profile
from .precision import resolve_precision
from .runtime import (Preemption, build_accelerator, check_world_size, local_device, print0, request_requeue,
                      set_cpu_threads)
from .tasks import TASKS

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


@dataclass
class WindowSums:
    """Per-log-window sums kept on the device; read (one sync) and reset only on log steps."""

    loss: torch.Tensor
    correct: torch.Tensor
    grad_norm: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> "WindowSums":
        return cls(*(torch.zeros((), device=device) for _ in range(3)))


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient under --on-nonfinite stop."""


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; every rank saved at ``step`` and the process should exit 143."""

    def __init__(self, step: int, checkpoint: Path, signal_name: str):
        super().__init__(f"{signal_name}: saved {checkpoint} at step {step}")
        self.step, self.checkpoint = step, checkpoint


def agree(accelerator: Accelerator, flags: torch.Tensor) -> List[float]:
    """The maximum of each flag over all ranks (one all-reduce; no collective on one process)."""
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")
    return flags.tolist()


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns the summary (on every rank; only the main process writes it).

    Resumes from --run-dir's newest intact checkpoint unless --resume says otherwise. Raises
    Preempted after saving when SIGTERM/SIGUSR1 arrives, NonFiniteError under --on-nonfinite stop.
    """
    set_cpu_threads()
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    precision = resolve_precision(cfg.train.precision, cfg, local_device())
    accelerator = build_accelerator(cfg, precision)
    check_world_size(accelerator, cfg.train.expect_world_size)
    cfg.validate(accelerator.num_processes)
    d, t = cfg.data, cfg.train
    run_dir, device, rank, world = Path(t.run_dir), accelerator.device, accelerator.process_index, accelerator.num_processes
    task, spec = TASKS[d.task], cfg.task_spec()
    layout = Layout(cfg.micro_batch_size(world), world, t.grad_accum_steps)
    config = cfg.to_dict()

    torch.manual_seed(t.seed)
    model = build_model(cfg.model, task, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, t.max_steps))
    model, optimizer = accelerator.prepare(model, optimizer)  # the DataLoader is never prepared (DESIGN inv. 4)

    start, data_state = t.start_step, None
    resume_from = select_checkpoint(accelerator, t.run_dir, cfg.checkpoint.resume, lambda line: print0(accelerator, line))
    if resume_from:
        check_compatible(read_meta(resume_from), config, resume_from)
        restored = load_checkpoint(accelerator, resume_from, model, optimizer, scheduler)
        if d.data_files and restored.world_size != world:
            raise CheckpointError(f"{resume_from}: --data-files runs resume only on the same number of processes "
                                  f"({restored.world_size}, not {world}): the files' split depends on it")
        start, data_state = restored.step, restored.data_state
        print0(accelerator, f"distseq: resuming from {resume_from} (step {start}, {restored.samples} samples, "
                            f"written by {restored.world_size} process(es))")
        if start >= t.max_steps:
            print0(accelerator, f"distseq: already at step {start} >= --max-steps {t.max_steps}; nothing to train")
            previous = run_dir / "summary.json"
            return json.loads(previous.read_text()) if previous.is_file() else {"step": start}
    else:
        for _ in range(start):  # the schedule is a pure function of the step; catch up without training
            scheduler.step()

    eval_set = eval_batches(SampleSource(d.task, spec, t.seed, d.block_size, "eval"), rank, world, d.eval_size, EVAL_BATCH)
    if d.data_files:
        stream = FileStream(resolve_files(d.data_files), d.sequence_column, d.label_column, task, spec, rank, world,
                            layout.micro_batch)
        if data_state is not None:
            stream.load_state_dict(data_state)
        feed = FileFeed(stream, layout.grad_accum, accelerator)
    else:
        source = SampleSource(d.task, spec, t.seed, d.block_size, "train", d.dataset_size)
        loader = train_loader(source, layout, rank, start, t.max_steps - start, d.samples_per_example,
                              d.num_workers, pin_memory=device.type == "cuda")
        feed = SyntheticFeed(micro_batches(loader, layout.micro_batch), layout.grad_accum)

    if accelerator.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "config.json", config)
        except OSError as error:
            raise ConfigError("--run-dir", f"cannot write to {run_dir}: {error.strerror}") from None
    start_tracking(accelerator, cfg.flat(), purge_step=start + 1 if resume_from else None)
    print0(
        accelerator,
        f"distseq: world_size={world} backend={accelerator.state.backend or 'none'} device={device} "
        f"precision={precision.name} ({precision.reason}) micro_batch={layout.micro_batch} "
        f"grad_accum={layout.grad_accum} global_batch={layout.global_batch} run_dir={run_dir}",
    )

    sums = WindowSums.zeros(device)
    accounting = Accounting(start * layout.global_batch, world) if t.verify_data else None
    eval_metrics: Dict[str, float] = {}
    eval_history: List[dict] = []  # (step, training seconds, metrics) of every evaluation: accuracy over time
    skipped_steps = 0
    profiler = StepProfiler(cfg.profile_range(), run_dir, rank, device)
    checkpoint: Optional[Path] = resume_from
    meter = Throughput(start, start * layout.global_batch)
    bar = tqdm(total=t.max_steps, initial=start, desc="train",
               disable=not (accelerator.is_main_process and cfg.log.progress))
    clock = TrainingClock()  # evaluation and checkpoint writes pause it: they are not training time
    check_grads = precision.name != "fp16"  # under fp16 the grad scaler owns overflow: it skips those steps itself

    def log(done: int) -> None:
        nonlocal sums
        totals = accelerator.reduce(torch.stack([sums.loss, sums.correct]), "sum").tolist()
        window_samples = max(1, (done - meter.step) * layout.global_batch)
        scalars = {
            "train/loss": totals[0] / window_samples,
            "train/accuracy": totals[1] / window_samples,
            "train/lr": scheduler.get_last_lr()[0],
            "train/grad_norm": float(sums.grad_norm),
            "train/skipped_steps": skipped_steps,
            **meter.window(done, done * layout.global_batch),
        }
        sums = WindowSums.zeros(device)
        accelerator.log(scalars, step=done)
        if accelerator.is_main_process:
            bar.write(log_line(done, t.max_steps, scalars))

    def optimizer_step(step_loss: torch.Tensor, done: int):
        """Clip, agree with every rank on non-finite values and preemption, then step unless non-finite."""
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        bad = ~torch.isfinite(step_loss) | (~torch.isfinite(grad_norm) if check_grads else False)
        nonfinite, stop = agree(accelerator, torch.stack(
            [bad.float(), torch.tensor(float(preemption.received), device=device)]))
        if nonfinite and t.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradient at step {done}; stopped without "
                                 f"saving (--on-nonfinite skip skips such steps)")
        if not nonfinite:
            optimizer.step()
        return nonfinite, stop, grad_norm

    def evaluate_and_log(done: int) -> Dict[str, float]:
        at = clock.train_seconds()
        with clock.pause():
            metrics = evaluate(accelerator, model, task, eval_set, d.eval_size, spec.variable)
            accelerator.log(metrics, step=done)
            if accelerator.is_main_process:
                bar.write(log_line(done, t.max_steps, metrics))
        eval_history.append({"step": done, "train_seconds": at, **metrics})
        return metrics

    def save(done: int) -> Path:
        with clock.pause():
            return save_checkpoint(accelerator, model, optimizer, scheduler, step=done,
                                   samples=done * layout.global_batch, config=config,
                                   keep_last=cfg.checkpoint.keep_last, data_state=feed.state_dict())

    def result(done: int, status: str) -> dict:
        seconds = clock.train_seconds()
        extra = {"checkpoint": str(checkpoint), "micro_batch": layout.micro_batch,
                 "global_batch": layout.global_batch, "start_step": start, "skipped_steps": skipped_steps,
                 "status": status, "resumed_from": str(resume_from) if resume_from else None,
                 "train_seconds": seconds, "steps_per_sec": (done - start) / max(seconds, 1e-9),
                 "eval_history": eval_history}
        if profiler.result:
            extra["profile"] = profiler.result
        if accounting:
            extra["data_accounting"] = accounting.report()
        out = summary(
            step=done, samples=done * layout.global_batch,
            trained_samples=(done - start) * layout.global_batch, wall_seconds=clock.wall_seconds(),
            eval_metrics=eval_metrics, precision=precision.name, accelerator=accelerator, model=cfg.model.kind,
            task=d.task, extra=extra,
        )
        if accelerator.is_main_process:
            write_json(run_dir / "summary.json", out)
        return out

    done = start
    with Preemption() as preemption:
        for step in range(start, t.max_steps):
            profiler.begin(step)
            with profiler.span("data"):
                micro = feed.next_step()
            if micro is None:  # every rank agreed the data files are used up
                break
            done = step + 1
            is_log_step = done % cfg.log.log_every == 0 or done == t.max_steps
            is_eval_step = done == t.max_steps or (t.eval_every and done % t.eval_every == 0)
            step_loss = torch.zeros((), device=device)
            step_correct = torch.zeros((), device=device)
            for batch in micro:
                y = batch["y"].to(device, non_blocking=True)
                with accelerator.accumulate(model):
                    with profiler.span("forward_backward"):
                        logits = forward(model, batch, device, spec.variable)
                        losses = task.loss(logits, y)  # (b,)
                        accelerator.backward(losses.mean())
                        step_loss += losses.detach().sum()
                        step_correct += task.correct(logits.detach(), y).sum()
                    with profiler.span("optimizer"):
                        if accelerator.sync_gradients:
                            nonfinite, stop, grad_norm = optimizer_step(step_loss, done)
                        optimizer.zero_grad(set_to_none=True)
            with profiler.span("optimizer"):
                scheduler.step()
            with profiler.span("logging"):
                bar.update(1)
                if nonfinite:
                    skipped_steps += 1
                else:
                    sums.loss += step_loss
                    sums.correct += step_correct
                    sums.grad_norm = grad_norm
                if accounting:
                    for batch in micro:
                        accounting.window.add(batch["index"])
                if accounting and (is_log_step or is_eval_step or stop):
                    accounting.check(accelerator, done * layout.global_batch)
                if is_log_step:
                    log(done)
            if profiler.end(done) and accelerator.is_main_process:
                bar.write(format_profile(profiler.result))
                write_json(run_dir / "profile.json", profiler.result)
            if is_eval_step:
                eval_metrics = evaluate_and_log(done)
            every = cfg.checkpoint.checkpoint_every
            if done == t.max_steps or (every and done % every == 0) or stop:
                checkpoint = save(done)
            if stop:
                bar.close()
                signal_name = "SIGTERM" if int(stop) == 15 else "SIGUSR1" if int(stop) == 10 else f"signal {int(stop)}"
                print0(accelerator, f"distseq: {signal_name}: saved {checkpoint} at step {done}; exiting 143")
                if t.requeue and accelerator.is_main_process:
                    print0(accelerator, f"distseq: {request_requeue()}")
                result(done, "preempted")
                accelerator.end_training()
                raise Preempted(done, checkpoint, signal_name)
    bar.close()

    if done == start:
        raise DataFileError(f"--data-files hold fewer rows than one global batch ({layout.global_batch}) per step")
    if done < t.max_steps:  # the files ran out first: close the run at the last complete step
        print0(accelerator, f"distseq: data files used up after step {done}")
        if meter.step < done:
            log(done)
        eval_metrics = evaluate_and_log(done)
        checkpoint = save(done)

    out = result(done, "complete")
    accelerator.end_training()
    print0(
        accelerator,
        f"distseq: done: step={out['step']} eval/accuracy={eval_metrics['eval/accuracy']:.4f} "
        f"samples/s={out['samples_per_sec']:.0f}\n"
        f"  summary     {run_dir / 'summary.json'}\n"
        f"  checkpoint  {checkpoint}\n"
        f"  tensorboard tensorboard --logdir {run_dir / 'tensorboard'}",
    )
    return out
