"""The training loop: the one place that knows the order of a step.

Counted in optimizer steps. Each step consumes ``grad_accum_steps`` micro-batches per rank inside
``accelerator.accumulate``; losses and accuracies stay on the device and are reduced across ranks
only on log steps. The one read every step is two flags all ranks agree on (a non-finite loss or
gradient, a stop signal), so every rank takes the same branch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .accounting import Accounting
from .checkpoint import changed_options, check_compatible, load_checkpoint, save_checkpoint, select_checkpoint
from .config import TrainConfig, option_for
from .data import Layout, SampleSource, SyntheticFeed, eval_batches, micro_batches, train_loader
from .errors import DataFileError, NonFiniteError, RunIOError, Stopped
from .evaluation import EVAL_BATCH, evaluate, forward
from .failpoints import pause_point
from .files import FileFeed, FileStream, resolve_files
from .io import write_json
from .metrics import Throughput, TrainingClock, log_line, start_tracking, summary
from .models import build_model
from .optim import apply_options, build_optimizer
from .precision import resolve_precision
from .profiling import StepProfiler, format_profile
from .rundir import RunDir, open_run_dir
from .runtime import (StopSignals, build_accelerator, check_world_size, exit_code, local_device, print0,
                      request_requeue, set_cpu_threads, show_progress, signal_name)
from .tasks import TASKS


@dataclass
class Window:
    """What happened since the last log step. Loss and correct-count sums stay on the device (read
    with one sync on log steps); they cover applied steps only, never a skipped one."""

    loss: torch.Tensor
    correct: torch.Tensor
    grad_norm: Optional[torch.Tensor] = None
    applied: int = 0
    skipped: int = 0

    @classmethod
    def empty(cls, device: torch.device) -> "Window":
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))


@dataclass
class Progress:
    """The run's history that outlives a process: saved in every checkpoint, restored on resume, so
    summary.json after a resume covers the whole run."""

    first_step: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    skipped_steps: int = 0
    eval_history: List[dict] = field(default_factory=list)
    config_history: List[dict] = field(default_factory=list)
    data_exhausted: bool = False

    @classmethod
    def restore(cls, saved: dict) -> "Progress":
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def agree(accelerator: Accelerator, flags: torch.Tensor) -> List[float]:
    """The maximum of each flag over all ranks (one all-reduce; no collective on one process)."""
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")
    return flags.tolist()


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns the summary (on every rank; only the main process writes it).

    Resumes from --run-dir's newest intact checkpoint unless --resume says otherwise. Raises Stopped
    after saving when SIGINT/SIGTERM/SIGUSR1/SIGHUP arrives (or, during start-up, before anything is
    saved), NonFiniteError, RunIOError, ConfigError, CheckpointError: each a one-line message.
    """
    with StopSignals() as signals:
        set_cpu_threads()
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
        precision = resolve_precision(cfg.train.precision, cfg, local_device())
        accelerator = build_accelerator(cfg, precision)
        try:
            check_world_size(accelerator, cfg.train.expect_world_size)
            cfg.validate(accelerator.num_processes)
            with open_run_dir(accelerator, cfg) as run_dir:
                return _train(cfg, accelerator, precision, signals, run_dir)
        finally:
            accelerator.end_training()


def _train(cfg: TrainConfig, accelerator: Accelerator, precision, signals: StopSignals, run: RunDir) -> dict:
    d, t = cfg.data, cfg.train
    run_dir, device, rank, world = run.path, accelerator.device, accelerator.process_index, accelerator.num_processes
    task, spec = TASKS[d.task], cfg.task_spec()
    layout = Layout(cfg.micro_batch_size(world), world, t.grad_accum_steps)
    config = cfg.to_dict()
    say = lambda line: print0(accelerator, line)  # noqa: E731
    if run.moved_aside:
        say(f"distseq: --overwrite: moved the earlier run in {run_dir} aside to {run.moved_aside}")
    pause_point("startup")

    torch.manual_seed(t.seed)
    model = build_model(cfg.model, task, spec)
    optimizer, scheduler = build_optimizer(model, cfg.optim, t.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)  # the DataLoader is never prepared (docs/design.md, invariant 4)

    start, data_state, progress = t.start_step, None, Progress(first_step=t.start_step)
    resume = "never" if run.moved_aside else cfg.checkpoint.resume
    resume_from, meta = select_checkpoint(accelerator, run_dir, resume, say)
    if resume_from:
        check_compatible(meta, config, resume_from)
        restored = load_checkpoint(accelerator, resume_from, meta, model, optimizer)
        if d.data_files and restored.world_size != world:
            raise DataFileError(f"{resume_from}: --data-files runs resume only on the same number of processes "
                                f"({restored.world_size}, not {world}): the files' split depends on it")
        start, data_state, progress = restored.step, restored.data_state, Progress.restore(restored.progress)
        say(f"distseq: resuming from {resume_from} (step {start}, {restored.samples} samples, "
            f"written by {restored.world_size} process(es))")
        changes = changed_options(meta, config)
        if changes:
            progress.config_history.append({"step": start, "changes": changes})
            say("distseq: changed on resume: " + ", ".join(
                f"{option_for(key)} {then} -> {now} from step {start}" for key, (then, now) in changes.items()))
        finished = "already at step {} >= --max-steps {}".format(start, t.max_steps) if start >= t.max_steps else (
            f"the data files were used up at step {start}" if progress.data_exhausted else "")
        if finished:
            say(f"distseq: {finished}; nothing to train")
            previous = run_dir / "summary.json"
            return json.loads(previous.read_text()) if previous.is_file() else {"step": start, "status": "complete"}
    apply_options(optimizer, scheduler, cfg.optim, start)  # O(1) at any step; the options in force now
    if not progress.config_history:
        progress.config_history.append({"step": start, "config": config})

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

    checkpoint: Optional[Path] = resume_from

    def write(path: Path, payload) -> None:
        """A run file on the main process; an I/O error is one line naming the file and what was kept."""
        if not accelerator.is_main_process:
            return
        try:
            write_json(path, payload)
        except OSError as error:
            kept = f"kept {checkpoint}" if checkpoint else "no checkpoint was written yet"
            raise RunIOError(f"cannot write {path}: {error.strerror or error}; {kept}") from None

    write(run_dir / "config.json", config)
    write(run_dir / "config_history.json", progress.config_history)
    # a fresh start over what a run killed before its first checkpoint logged: hide those curves
    purge = start + 1 if resume_from else (1 if (run_dir / "tensorboard").is_dir() else None)
    start_tracking(accelerator, cfg.flat(), purge_step=purge)
    say(f"distseq: world_size={world} backend={accelerator.state.backend or 'none'} device={device} "
        f"precision={precision.name} ({precision.reason}) micro_batch={layout.micro_batch} "
        f"grad_accum={layout.grad_accum} global_batch={layout.global_batch} run_dir={run_dir}")

    window = Window.empty(device)
    accounting = Accounting(start * layout.global_batch, world) if t.verify_data else None
    eval_metrics: Dict[str, float] = {}
    profiler = StepProfiler(cfg.profile_range(), run_dir, rank, device)
    clock = TrainingClock(progress.train_seconds, progress.wall_seconds)  # evaluation and checkpoints pause it
    meter = Throughput(start, start * layout.global_batch, clock)
    bar = tqdm(total=t.max_steps, initial=start, desc="train",
               disable=not (accelerator.is_main_process and show_progress(cfg.log.progress)))
    check_grads = precision.name != "fp16"  # under fp16 the grad scaler owns overflow: it skips those steps itself
    skip_limit = math.floor(t.max_skipped_fraction * t.max_steps)

    def emit(line: str) -> None:
        if accelerator.is_main_process:
            bar.write(line) if not bar.disable else print(line, flush=True)

    def log(done: int) -> None:
        nonlocal window
        scalars: Dict[str, float] = {}
        if window.applied:  # all ranks agree on `applied`: the same collectives run everywhere
            totals = accelerator.reduce(torch.stack([window.loss, window.correct]), "sum").tolist()
            samples = window.applied * layout.global_batch
            scalars.update({"train/loss": totals[0] / samples, "train/accuracy": totals[1] / samples})
        scalars["train/lr"] = scheduler.get_last_lr()[0]
        if window.grad_norm is not None:
            scalars["train/grad_norm"] = float(window.grad_norm)
        scalars["train/skipped_steps"] = progress.skipped_steps
        scalars["train/skipped_steps_window"] = window.skipped
        scalars.update(meter.window(done, done * layout.global_batch))
        window = Window.empty(device)
        accelerator.log(scalars, step=done)
        emit(log_line(done, t.max_steps, scalars))

    def optimizer_step(step_loss: torch.Tensor, done: int):
        """Clip, agree with every rank on non-finite values and stop signals, then step unless non-finite."""
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        bad = ~torch.isfinite(step_loss) | (~torch.isfinite(grad_norm) if check_grads else False)
        nonfinite, stop = agree(accelerator, torch.stack(
            [bad.float(), torch.tensor(float(signals.received), device=device)]))
        if nonfinite and t.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradient at step {done}; stopped without "
                                 f"saving (--on-nonfinite skip skips such steps)")
        if not nonfinite:
            optimizer.step()
        return bool(nonfinite), int(stop), grad_norm

    def evaluate_and_log(done: int) -> Dict[str, float]:
        at = clock.train_seconds()
        with clock.pause():
            metrics = evaluate(accelerator, model, task, eval_set, d.eval_size, spec.variable)
            accelerator.log(metrics, step=done)
            emit(log_line(done, t.max_steps, metrics))
        progress.eval_history.append({"step": done, "train_seconds": at, **metrics})
        return metrics

    def save(done: int, exhausted: bool = False) -> Path:
        progress.train_seconds, progress.wall_seconds = clock.train_seconds(), clock.wall_seconds()
        progress.data_exhausted = exhausted
        with clock.pause():
            return save_checkpoint(accelerator, run_dir, model, optimizer, step=done,
                                   samples=done * layout.global_batch, config=config, progress=vars(progress),
                                   keep_last=cfg.checkpoint.keep_last, data_state=feed.state_dict(),
                                   previous=checkpoint)

    def result(done: int, status: str) -> dict:
        seconds = clock.train_seconds()
        extra = {"checkpoint": str(checkpoint), "micro_batch": layout.micro_batch,
                 "global_batch": layout.global_batch, "start_step": progress.first_step,
                 "skipped_steps": progress.skipped_steps, "status": status,
                 "resumed_from": str(resume_from) if resume_from else None,
                 "train_seconds": seconds, "steps_per_sec": (done - progress.first_step) / max(seconds, 1e-9),
                 "eval_history": progress.eval_history, "config_changes": progress.config_history[1:]}
        if profiler.result:
            extra["profile"] = profiler.result
        if accounting:
            extra["data_accounting"] = accounting.report()
        out = summary(
            step=done, samples=done * layout.global_batch,
            trained_samples=(done - progress.first_step) * layout.global_batch, wall_seconds=clock.wall_seconds(),
            eval_metrics=eval_metrics, precision=precision.name, accelerator=accelerator, model=cfg.model.kind,
            task=d.task, extra=extra,
        )
        write(run_dir / "summary.json", out)
        return out

    done = start
    signals.begin_loop()
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
        with profiler.span("optimizer"), warnings.catch_warnings():
            if nonfinite:  # a skipped step still advances the schedule (a function of the step): expected
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
        with profiler.span("logging"):
            bar.update(1)
            if nonfinite:
                progress.skipped_steps += 1
                window.skipped += 1
            else:
                window.loss += step_loss
                window.correct += step_correct
                window.grad_norm, window.applied = grad_norm, window.applied + 1
            if accounting:
                for batch in micro:
                    accounting.window.add(batch["index"])
            if accounting and (is_log_step or is_eval_step or stop):
                accounting.check(accelerator, done * layout.global_batch)
            if is_log_step:
                log(done)
        if nonfinite and progress.skipped_steps > skip_limit:
            raise NonFiniteError(
                f"{progress.skipped_steps} optimizer steps skipped for non-finite values by step {done}, more than "
                f"--max-skipped-fraction {t.max_skipped_fraction:g} of --max-steps {t.max_steps}; stopped without "
                f"saving" + (f" (kept {checkpoint})" if checkpoint else ""))
        if profiler.end(done) and accelerator.is_main_process:
            emit(format_profile(profiler.result))
            write(run_dir / "profile.json", profiler.result)
        if is_eval_step:
            eval_metrics = evaluate_and_log(done)
        every = cfg.checkpoint.checkpoint_every
        if stop:
            pause_point("stopping")
        if done == t.max_steps or (every and done % every == 0) or stop:
            checkpoint = save(done)
        if stop:
            bar.close()
            code, name = exit_code(stop), signal_name(stop)
            status = "interrupted" if stop == signal.SIGINT else "preempted"
            say(f"distseq: {name}: saved {checkpoint} at step {done}; exiting {code}")
            if t.requeue and status == "preempted" and accelerator.is_main_process:
                say(f"distseq: {request_requeue()}")
            result(done, status)
            raise Stopped(f"{name}: saved {checkpoint} at step {done}", code, done)
    bar.close()

    if done < t.max_steps:  # the files ran out first: close the run at the last complete step
        if done == start and not resume_from:
            raise DataFileError(f"--data-files hold fewer rows than one global batch ({layout.global_batch}) per step")
        say(f"distseq: data files used up after step {done}")
        if meter.step < done:
            log(done)
        eval_metrics = evaluate_and_log(done)
        checkpoint = save(done, exhausted=True)

    out = result(done, "complete")
    say(f"distseq: done: step={out['step']} eval/accuracy={eval_metrics['eval/accuracy']:.4f} "
        f"samples/s={out['samples_per_sec']:.0f}\n"
        f"  summary     {run_dir / 'summary.json'}\n"
        f"  checkpoint  {checkpoint}\n"
        f"  tensorboard tensorboard --logdir {run_dir / 'tensorboard'}")
    return out
