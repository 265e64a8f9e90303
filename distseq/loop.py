"""The training loop: the one place that knows the order of a step.

``train(cfg)`` = ``build_run`` (everything before the first step: precision, Accelerator, run
directory, resume, data) + ``run_loop`` (the steps) + ``finish``. Components decide their own timing:
the step logger when to log, the evaluator when to evaluate, the checkpoint manager when to save,
the profiler when to record; the loop asks them in order. Counted in optimizer steps; each step
consumes ``grad_accum_steps`` micro-batches per rank inside ``accelerator.accumulate``. The one read
every step is two flags all ranks agree on (a non-finite loss or gradient, a stop signal), so every
rank takes the same branch.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from accelerate import Accelerator
from torch import nn

from .accounting import Accounting
from .checkpoint import CheckpointManager, changed_options, check_compatible, load_checkpoint
from .config import TrainConfig, option_for
from .data import Layout, SampleSource, SyntheticFeed, eval_batches, micro_batches, train_loader
from .errors import CheckpointError, DataFileError, DistseqError, NonFiniteError, RunIOError, Stopped
from .evaluation import Evaluator, eval_batch_size, forward
from .failpoints import pause_point, slow_rank_seconds
from .hangs import HangReport
from .file_index import FileIndex, FileSource, check_same_everywhere, open_index
from .file_stream import FileFeed, FileStream
from .files import resolve_files
from .io import write_json
from .flops import flops_per_token
from .metrics import StepLogger, TrainingClock, start_tracking, summary, throughput
from .models import build_model
from .optim import apply_options, build_optimizer
from .precision import Precision, resolve_precision
from .profiling import StepProfiler, format_profile
from .registry import TASKS
from .rundir import RunDir, open_run_dir
from .startup import StartupTimeline
from .sharding import full_value, quiet_fsdp_warnings, resolve_sharding, set_gradient_sync, shard_model
from .runtime import (StopSignals, build_accelerator, check_world_size, ddp_without_buffer_notice, exit_code,
                      is_collective_failure, local_device, needs_buffer_broadcast, print0, request_requeue,
                      set_cpu_threads, show_progress, signal_name)
from .tasks import Task, TaskSpec


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
    tokens: int = 0  # time steps (padding excluded) trained on since first_step, over all ranks
    tokens_estimated_before: Optional[int] = None  # a checkpoint from before tokens were counted: its step

    @classmethod
    def restore(cls, saved: dict) -> "Progress":
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})


@dataclass
class Outcome:
    """One optimizer step as every rank agreed on it."""

    loss: torch.Tensor  # summed over the step's samples on this rank, on the device
    correct: torch.Tensor
    solved: torch.Tensor
    tokens: int  # time steps of the step's samples on this rank, padding excluded
    grad_norm: torch.Tensor
    skipped: bool  # non-finite loss or gradient on some rank: no update anywhere
    stop: int  # a stop signal's number on some rank, else 0


@dataclass
class Run:
    """Everything the steps need, built once by ``build_run``."""

    cfg: TrainConfig
    accelerator: Accelerator
    precision: Precision
    signals: StopSignals
    run_dir: RunDir
    task: Task
    spec: TaskSpec
    layout: Layout
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpoints: CheckpointManager
    progress: Progress
    start: int
    resumed_from: Optional[Path]
    config: dict
    feed: object = None
    logger: Optional[StepLogger] = None
    evaluator: Optional[Evaluator] = None
    profiler: Optional[StepProfiler] = None
    accounting: Optional[Accounting] = None
    clock: Optional[TrainingClock] = None
    nothing_left: Optional[dict] = None  # a finished run started again: its summary
    files: Optional[FileIndex] = None  # indexed --data-files
    model_name: str = ""  # --model, or the class of a module given to train(model=...)
    flops_per_token: float = 0.0  # training FLOPs per token of this model (flops.py)
    sharding: str = "none"  # --sharding as it applies: none, ddp or fsdp
    startup: StartupTimeline = field(default_factory=StartupTimeline)  # process start to the first step

    @property
    def path(self) -> Path:
        return self.run_dir.path

    def say(self, line: str) -> None:
        print0(self.accelerator, line)

    def write_agreed(self, files: dict) -> None:
        """Run files written by the main process while the others wait for it: every rank learns the
        outcome (one all-reduce), so a failed write is the same one line everywhere, never a hang."""
        problem = None
        try:
            for name, payload in files.items():
                self.write(name, payload)
        except RunIOError as error:
            problem = error
        if self.accelerator.num_processes > 1:
            flag = torch.tensor(float(problem is not None), device=self.accelerator.device)
            if self.accelerator.reduce(flag, "max").item() and problem is None:
                problem = RunIOError(f"the main process could not write {', '.join(files)} in {self.path}")
        if problem is not None:
            raise problem

    def write(self, name: str, payload) -> None:
        """A run file, on the main process; an I/O error is one line naming it and what was kept."""
        if self.accelerator.is_main_process:
            try:
                write_json(self.path / name, payload)
            except OSError as error:
                raise RunIOError(f"cannot write {self.path / name}: {error.strerror or error}; "
                                 f"{self.checkpoints.kept()}") from None


def train(cfg: TrainConfig, model: Optional[nn.Module] = None) -> dict:
    """Train as configured; returns the summary (on every rank; only the main process writes it).

    ``model``: an ``nn.Module`` of your own (``model(x, lengths) -> logits`` for the task's head)
    instead of the registered ``--model``. Resumes from --run-dir's newest intact checkpoint unless
    --resume says otherwise. Raises Stopped after saving when SIGINT/SIGTERM/SIGUSR1/SIGHUP arrives (or,
    during start-up, before anything is saved), NonFiniteError, RunIOError, ConfigError,
    CheckpointError, LostContactError (a collective failed; this rank's stacks are in RUN/hang-rank{N}.txt):
    each a one-line message.
    """
    groups: list = []  # the process group, released only once the run (and its DDP model) is gone
    try:
        return _train(cfg, model, groups)
    except BaseException as error:
        if groups:  # the frames of the exception chain hold the run, so the DDP model
            clear_frames(error)
        raise
    finally:
        # DDP's reducer holds the process group, which end_training has already destroyed. Freed last by
        # the reducer, the group's destructor runs with Python's lock held and joins the backend's threads,
        # one of which may need that lock to free a finished collective's tensors: the rank never exits
        # (pytorch/pytorch#56297; seen here in about 1 of 4 runs on 8 ranks, at the return of train). So
        # the model goes first, and the group's last reference is this one, whose destructor (torch's
        # binding) releases the lock.
        if groups:
            gc.collect()
            groups.clear()


def clear_frames(error: BaseException) -> None:
    """Drop the local variables of every frame in an exception's chain (its cause and context too)."""
    seen, pending = set(), [error]
    while pending:
        chained = pending.pop()
        if chained is None or id(chained) in seen:
            continue
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)
        pending += [chained.__cause__, chained.__context__]


def _train(cfg: TrainConfig, model: Optional[nn.Module], groups: list) -> dict:
    hangs = HangReport()
    with StopSignals() as signals, contextlib.ExitStack() as cleanup:
        try:
            run = build_run(cfg, model, signals, cleanup, hangs, groups)
            if run.nothing_left is not None:
                return run.nothing_left
            done = run_loop(run)
            return finish(run, done)
        except RuntimeError as error:
            if isinstance(error, DistseqError) or not hangs.attached or not is_collective_failure(error):
                raise
            raise hangs.lost_contact(error) from None  # the stacks are written before the cleanup runs


def build_run(cfg: TrainConfig, model: Optional[nn.Module], signals: StopSignals,
              cleanup: contextlib.ExitStack, hangs: Optional[HangReport] = None,
              groups: Optional[list] = None) -> Run:
    """Everything before the first step; ``cleanup`` ends the trackers and releases the run dir;
    ``hangs`` learns where a failed collective's stacks go; ``groups`` receives the process group, for
    the caller to release after the run."""
    startup = StartupTimeline()
    startup.mark("imports")  # the interpreter, torch, accelerate, distseq
    set_cpu_threads()
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # the launch's count; check_world_size confirms it
    d, t = cfg.data, cfg.train
    task, spec = TASKS[d.task], cfg.task_spec()
    files = open_files(cfg)  # every row checked before anything of the run is written
    startup.mark("data_index")
    torch.manual_seed(t.seed)
    model_name = cfg.model.kind if model is None else f"{type(model).__module__}.{type(model).__qualname__}"
    model = model if model is not None else build_model(cfg.model, task, spec)
    startup.mark("model")
    sharding = resolve_sharding(t.sharding, int(os.environ.get("WORLD_SIZE", "1")))
    # probes this very model, as it will run: under FSDP2's policy when sharded
    precision = resolve_precision(t.precision, cfg, local_device(), model, sharded=sharding == "fsdp")
    startup.mark("precision_probe")
    # constant buffers need no broadcast at each forward, which would also make every rank wait for the
    # slowest inside the forward that the straggler report times
    accelerator = build_accelerator(cfg, precision, sharding, broadcast_buffers=needs_buffer_broadcast(model))
    if groups is not None and torch.distributed.is_initialized():
        groups.append(torch.distributed.group.WORLD)
    check_world_size(accelerator, t.expect_world_size)
    if files is not None:
        check_same_everywhere(files, accelerator)
    startup.mark("rendezvous")  # every rank waits here for the slowest to arrive
    run_dir = cleanup.enter_context(open_run_dir(accelerator, cfg))
    if hangs is not None:
        hangs.attach(run_dir.path, accelerator.process_index, accelerator.num_processes)
    cleanup.callback(accelerator.end_training)  # trackers end before the run dir's lock is released
    world, config = accelerator.num_processes, cfg.to_dict()
    if run_dir.moved_aside:
        print0(accelerator, f"distseq: --overwrite: moved the earlier run in {run_dir.path} aside to "
                            f"{run_dir.moved_aside}")
    pause_point("startup")

    model_flops = flops_per_token(model, spec.seq_len)
    sharded = ""
    if sharding == "fsdp":  # before the optimizer exists: it must hold the sharded parameters
        sharded = shard_model(model, precision.name, accelerator.device)
        quiet_fsdp_warnings()
    optimizer, scheduler = build_optimizer(model, cfg.optim, t.max_steps)
    if sharding == "fsdp":
        optimizer = accelerator.prepare(optimizer)
    else:
        with ddp_without_buffer_notice():
            model, optimizer = accelerator.prepare(model, optimizer)  # the DataLoader never is (docs/design.md, invariant 4)
    checkpoints = CheckpointManager(accelerator, run_dir.path, cfg.checkpoint.checkpoint_every,
                                    cfg.checkpoint.keep_last, t.max_steps, sharding, cfg.checkpoint.async_checkpoint,
                                    t.dist_timeout_s)
    cleanup.callback(checkpoints.close)  # a background save completes before the run dir's lock is released
    run = Run(cfg, accelerator, precision, signals, run_dir, task, spec,
              Layout(cfg.micro_batch_size(world), world, t.grad_accum_steps), model, optimizer, scheduler,
              checkpoints, Progress(first_step=t.start_step), t.start_step, None, config, model_name=model_name,
              flops_per_token=model_flops, files=files, sharding=sharding, startup=startup)
    startup.mark("run_dir_and_optimizer")
    data_state = resume(run)
    startup.mark("resume")
    if run.nothing_left is not None:
        return run
    apply_options(optimizer, scheduler, cfg.optim, run.start)  # O(1) at any step; the options in force now
    if not run.progress.config_history:
        run.progress.config_history.append({"step": run.start, "config": config})
    run.feed = training_feed(run, data_state)

    run.write_agreed({"config.json": config, "config_history.json": run.progress.config_history})
    # a fresh start over what a run killed before its first checkpoint logged: hide those curves
    purge = run.start + 1 if run.resumed_from else (1 if (run.path / "tensorboard").is_dir() else None)
    start_tracking(accelerator, cfg.flat(), purge_step=purge)
    layout = run.layout
    run.say(f"distseq: world_size={world} backend={accelerator.state.backend or 'none'} device={accelerator.device} "
            f"sharding={sharding} precision={precision.name} ({precision.reason}) micro_batch={layout.micro_batch} "
            f"grad_accum={layout.grad_accum} global_batch={layout.global_batch} run_dir={run.path}")
    if sharded:
        run.say(f"distseq: {sharded}")
    if files is not None:
        run.say(f"distseq: data: {files.rows} rows in {len(files.files)} file(s); one epoch = "
                f"{files.rows / layout.global_batch:.6g} steps of {layout.global_batch}, reshuffled each epoch")

    rank = accelerator.process_index
    run.clock = TrainingClock(run.progress.train_seconds, run.progress.wall_seconds)  # evaluation, saves pause it
    run.logger = StepLogger(accelerator, cfg.log.log_every, t.max_steps, layout.global_batch, run.start, run.clock,
                            show_progress(cfg.log.progress), run.flops_per_token, task.head == "per-step",
                            run.progress.tokens, cfg.log.straggler_factor)
    cleanup.callback(run.logger.close)
    held_out = eval_batches(SampleSource(d.task, spec, t.seed, d.block_size, "eval"), rank, world, d.eval_size,
                            eval_batch_size(task, spec))
    run.evaluator = Evaluator(accelerator, model, task, held_out, d.eval_size, spec.variable, t.eval_every,
                              t.max_steps, run.clock, run.progress.eval_history, run.logger.emit)
    run.profiler = StepProfiler(cfg.profile_range(), run.path, rank, accelerator.device)
    run.accounting = Accounting(run.start * layout.global_batch, world) if t.verify_data else None
    startup.mark("data_pipeline")
    return run


def resume(run: Run) -> Optional[dict]:
    """Restore the newest intact checkpoint (or --resume PATH) into the run; the data state it holds."""
    cfg, accelerator = run.cfg, run.accelerator
    wanted = "never" if run.run_dir.moved_aside else cfg.checkpoint.resume
    path, meta = run.checkpoints.select(wanted, run.say)
    if path is None:
        return None
    check_compatible(meta, run.config, path)
    check_same_data(run, meta, path)
    restored = load_checkpoint(accelerator, path, meta, run.model, run.optimizer, run.checkpoints.group)
    if cfg.data.data_streaming and restored.world_size != accelerator.num_processes:
        raise CheckpointError(f"{path}: --data-streaming runs resume only on the same number of processes "
                              f"({restored.world_size}, not {accelerator.num_processes}): the files' split depends "
                              f"on it (indexed --data-files resume on any number)")
    run.start, run.resumed_from, run.progress = restored.step, path, Progress.restore(restored.progress)
    if "tokens" not in restored.progress:  # written before tokens were counted: exact for fixed lengths
        steps = (run.start - run.progress.first_step) * run.layout.global_batch
        mean_length = run.spec.seq_len if not run.spec.variable else (run.spec.min_seq_len + run.spec.seq_len) / 2
        run.progress.tokens = round(steps * mean_length)
        if run.spec.variable:
            run.progress.tokens_estimated_before = run.start
    run.say(f"distseq: resuming from {path} (step {run.start}, {restored.samples} samples, "
            f"written by {restored.world_size} process(es), sharding "
            f"{meta.get('sharding', 'ddp' if restored.world_size > 1 else 'none')})"
            + (f"; --start-step {cfg.train.start_step} applies to a fresh start only" if cfg.train.start_step else ""))
    if not run.progress.config_history:  # a checkpoint from before histories were kept
        run.progress.config_history.append({"step": run.progress.first_step, "config": meta["config"]})
    changes = changed_options(meta, run.config)
    if changes:
        run.progress.config_history.append({"step": run.start, "changes": changes})
        run.say("distseq: changed on resume: " + ", ".join(
            f"{option_for(key)} {then} -> {now} from step {run.start}" for key, (then, now) in changes.items()))
    max_steps = cfg.train.max_steps
    finished = (f"already at step {run.start} >= --max-steps {max_steps}" if run.start >= max_steps else
                f"the data files were used up at step {run.start}" if run.progress.data_exhausted else "")
    if finished:
        run.say(f"distseq: {finished}; nothing to train")
        run.nothing_left = finished_summary(run, restored)
    return restored.data_state


def check_same_data(run: Run, meta: dict, path: Path) -> None:
    """An indexed --data-files run resumes only on the rows its checkpoint was trained on (their count and
    content hash, wherever the files lie now)."""
    if run.files is None:
        return
    then, now = meta.get("data") or {}, run.files.identity()  # check_compatible refused streamed checkpoints
    if (then.get("rows"), then.get("sha256")) != (now["rows"], now["sha256"]):
        raise CheckpointError(f"{path} was trained on other data: {then.get('rows')} rows in {then.get('files')} "
                              f"file(s), sha256 {str(then.get('sha256'))[:12]}; --data-files now hold {now['rows']} rows "
                              f"in {now['files']}, sha256 {now['sha256'][:12]} (restore those files, or --resume never "
                              f"in a new --run-dir)")


def open_files(cfg: TrainConfig) -> Optional[FileIndex]:
    """The index of --data-files (built where missing or stale), None for the synthetic stream or
    --data-streaming. Before the Accelerator exists, so the launch's RANK says who prints."""
    d = cfg.data
    if not d.data_files or d.data_streaming:
        return None
    main = os.environ.get("RANK", "0") == "0"
    index = open_index(resolve_files(d.data_files), TASKS[d.task], cfg.task_spec(), d.sequence_column,
                       d.label_column, d.data_cache, say=(lambda line: print(line, flush=True)) if main else
                       (lambda line: None), progress=main and show_progress(cfg.log.progress))
    return index.open()


def finished_summary(run: Run, restored) -> dict:
    """The summary of a run that has nothing left to train: summary.json when it describes the
    checkpoint's step, else (killed after its last checkpoint, before the summary) one rebuilt from
    what the checkpoint recorded, and written."""
    previous = run.path / "summary.json"
    try:
        summary_then = json.loads(previous.read_text())
    except (OSError, ValueError):
        summary_then = {}
    if isinstance(summary_then, dict) and summary_then.get("step") == run.start and \
            summary_then.get("status") == "complete":
        return summary_then
    progress = run.progress
    history = progress.eval_history
    rebuilt = {"step": run.start, "samples": restored.samples, "status": "complete", "world_size": restored.world_size,
               "checkpoint": str(run.resumed_from), "train_seconds": progress.train_seconds,
               "wall_seconds": progress.wall_seconds, "skipped_steps": progress.skipped_steps,
               "eval_history": history, "config_changes": progress.config_history[1:], "task": run.cfg.data.task,
               "model": run.model_name, "start_step": progress.first_step,
               **throughput(restored.samples - progress.first_step * run.layout.global_batch, progress.tokens,
                            progress.train_seconds, run.flops_per_token, run.accelerator.device,
                            run.accelerator.num_processes),
               **{k: v for k, v in (history[-1] if history else {}).items() if k.startswith("eval/")},
               "note": "rebuilt from the checkpoint: the run ended after its last checkpoint, before its summary"}
    run.write("summary.json", rebuilt)
    return rebuilt


def training_feed(run: Run, data_state: Optional[dict]):
    """This rank's micro-batches from the run's start: the synthetic stream, or the data files."""
    d, t, layout, rank = run.cfg.data, run.cfg.train, run.layout, run.accelerator.process_index
    if d.data_streaming:
        stream = FileStream(resolve_files(d.data_files), d.sequence_column, d.label_column, run.task, run.spec,
                            rank, layout.world_size, layout.micro_batch)
        if data_state is not None:
            stream.load_state_dict(data_state)
        return FileFeed(stream, layout.grad_accum, run.accelerator)
    source = (FileSource(run.files, t.seed, run.spec.variable) if run.files is not None else
              SampleSource(d.task, run.spec, t.seed, d.block_size, "train", d.dataset_size))
    loader = train_loader(source, layout, rank, run.start, t.max_steps - run.start, d.samples_per_example,
                          d.num_workers, pin_memory=run.accelerator.device.type == "cuda")
    return SyntheticFeed(micro_batches(loader, layout.micro_batch), layout.grad_accum)


def run_loop(run: Run) -> int:
    """The steps, from the run's start to --max-steps (or until the data files run out); the last done."""
    done = run.start
    run.signals.begin_loop()
    run.clock.begin_training()
    own_work, slow_seconds = run.logger.ranks.own_work, slow_rank_seconds(run.accelerator.process_index)
    for step in range(run.start, run.cfg.train.max_steps):
        run.profiler.begin(step)
        with run.profiler.span("data"), own_work():
            micro = run.feed.next_step()
            if slow_seconds:
                time.sleep(slow_seconds)
        if micro is None:  # every rank agreed the data files are used up
            break
        done = step + 1
        outcome = train_step(run, micro, done)
        if done == run.start + 1:
            run.startup.mark("first_step")
            run.say(run.startup.line())
        with run.profiler.span("logging"):
            record(run, micro, done, outcome)
        if run.profiler.end(done) and run.accelerator.is_main_process:
            run.logger.emit(format_profile(run.profiler.result))
            run.write("profile.json", run.profiler.result)
        if run.evaluator.due(done):
            run.evaluator.run(done)
        if outcome.stop:
            pause_point("stopping")
        if run.checkpoints.due(done, bool(outcome.stop)):
            save(run, done)
        if outcome.stop:
            stop(run, done, outcome.stop)
    return done


def train_step(run: Run, micro: list, done: int) -> Outcome:
    """Forward and backward over the step's micro-batches, then one agreed optimizer step."""
    accelerator, model, task, device = run.accelerator, run.model, run.task, run.accelerator.device
    loss, correct, solved = (torch.zeros((), device=device) for _ in range(3))
    tokens, outcome = 0, None
    for batch in micro:
        y = batch["y"].to(device, non_blocking=True)
        tokens += int(batch["lengths"].sum()) if "lengths" in batch else y.shape[0] * run.spec.seq_len
        with accelerator.accumulate(model):
            set_gradient_sync(model, accelerator.sync_gradients)
            with run.profiler.span("forward_backward"):
                with run.logger.ranks.own_work():  # before the backward: DDP's gradient sync waits for the others
                    logits = forward(model, batch, device, run.spec.variable)
                    losses = task.loss(logits, y)  # (b,)
                accelerator.backward(losses.mean())
                loss += losses.detach().sum()
                right, all_right = task.scores(logits.detach(), y)  # (b,) each
                correct += right.sum()
                solved += all_right.sum()
            with run.profiler.span("optimizer"):
                if accelerator.sync_gradients:
                    outcome = optimizer_step(run, loss, correct, solved, tokens, done)
                run.optimizer.zero_grad(set_to_none=True)
    with run.profiler.span("optimizer"), (warnings.catch_warnings() if outcome.skipped else contextlib.nullcontext()):
        if outcome.skipped:  # a skipped step still advances the schedule (a function of the step): expected
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        run.scheduler.step()
    return outcome


def optimizer_step(run: Run, loss: torch.Tensor, correct: torch.Tensor, solved: torch.Tensor, tokens: int,
                   done: int) -> Outcome:
    """Clip, agree with every rank on non-finite values and stop signals, then step unless non-finite."""
    accelerator, t = run.accelerator, run.cfg.train
    grad_norm = full_value(accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip or math.inf))
    bad = ~torch.isfinite(loss)
    if run.precision.name != "fp16":  # under fp16 the grad scaler owns overflow: it skips those steps itself
        bad |= ~torch.isfinite(grad_norm)
    flags = torch.stack([bad.float(), torch.tensor(float(run.signals.received), device=accelerator.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")  # the maximum over ranks: one all-reduce
    skipped, stop = flags.tolist()
    if skipped and t.on_nonfinite == "stop":
        raise NonFiniteError(f"non-finite loss or gradient at step {done}; stopped without saving "
                             f"(--on-nonfinite skip skips such steps)")
    if not skipped:
        with run.logger.ranks.own_work():
            run.optimizer.step()
    run.logger.ranks.step_done()
    return Outcome(loss, correct, solved, tokens, grad_norm, bool(skipped), int(stop))


def record(run: Run, micro: list, done: int, outcome: Outcome) -> None:
    """After a step: the log window, skipped-step accounting, the data digest, the log line when due."""
    t, progress, global_batch = run.cfg.train, run.progress, run.layout.global_batch
    run.logger.record(outcome.loss, outcome.correct, outcome.solved, outcome.tokens, outcome.grad_norm,
                      outcome.skipped)
    if outcome.skipped:
        progress.skipped_steps += 1
    if run.accounting:
        for batch in micro:
            run.accounting.window.add(batch["index"])
        if run.logger.due(done) or run.evaluator.due(done) or outcome.stop:
            run.accounting.check(run.accelerator, done * global_batch)
    if run.logger.due(done):
        run.logger.log(done, run.scheduler.get_last_lr()[0], progress.skipped_steps)
    if outcome.skipped and progress.skipped_steps > math.floor(t.max_skipped_fraction * t.max_steps):
        raise NonFiniteError(
            f"{progress.skipped_steps} optimizer steps skipped for non-finite values by step {done}, more than "
            f"--max-skipped-fraction {t.max_skipped_fraction:g} of --max-steps {t.max_steps}; stopped without "
            f"saving" + (f" (kept {run.checkpoints.newest})" if run.checkpoints.newest else ""))


def save(run: Run, done: int, exhausted: bool = False) -> None:
    with run.clock.pause():  # a touched file is hashed here: not training time
        check_files_unchanged(run, done)
    progress = run.progress
    progress.train_seconds, progress.wall_seconds = run.clock.train_seconds(), run.clock.wall_seconds()
    progress.data_exhausted = exhausted
    progress.tokens = run.logger.flush_tokens()  # every rank saves here: the all-reduce is in lockstep
    with run.clock.pause():
        run.checkpoints.save(done, run.model, run.optimizer, samples=done * run.layout.global_batch,
                                    config=run.config, progress=vars(progress), data_state=run.feed.state_dict(),
                                    data_identity=run.files.identity() if run.files is not None else None)


def check_files_unchanged(run: Run, done: int) -> None:
    """Before a checkpoint: the indexed files are still what was indexed (every rank agrees, one all-reduce).
    Training reads the index, so the run itself is intact, but a checkpoint would claim data that the
    files no longer hold: stop without writing it."""
    if run.files is None:
        return
    change = run.files.changed()
    if run.accelerator.num_processes > 1:
        flag = torch.tensor(float(change is not None), device=run.accelerator.device)
        if run.accelerator.reduce(flag, "max").item() and change is None:
            change = "a data file changed (another process saw it)"
    if change:
        raise DataFileError(f"--data-files: {change} while this run trained on it; stopped at step {done} without "
                            f"saving ({run.checkpoints.kept()}): restore the file to resume, or train anew on the "
                            f"new data in a new --run-dir")


def stop(run: Run, done: int, signum: int) -> None:
    """Every rank saved at ``done`` on a stop signal: write the summary and raise Stopped."""
    run.checkpoints.wait()
    run.logger.close()
    code, name = exit_code(signum), signal_name(signum)
    status = "interrupted" if signum == signal.SIGINT else "preempted"
    run.say(f"distseq: {name}: saved {run.checkpoints.newest} at step {done}; exiting {code}")
    if run.cfg.train.requeue and status == "preempted" and run.accelerator.is_main_process:
        run.say(f"distseq: {request_requeue()}")
    write_summary(run, done, status)
    raise Stopped(f"{name}: saved {run.checkpoints.newest} at step {done}", code, done)


def finish(run: Run, done: int) -> dict:
    """The run reached --max-steps, or the data files ran out first (closed at the last full step)."""
    run.logger.close()
    if done < run.cfg.train.max_steps:
        if done == run.start and not run.resumed_from:
            raise DataFileError(f"--data-files hold fewer rows than one global batch ({run.layout.global_batch}) "
                                f"per step")
        run.say(f"distseq: data files used up after step {done}")
        if run.logger.pending:
            run.logger.log(done, run.scheduler.get_last_lr()[0], run.progress.skipped_steps)
        run.evaluator.run(done)
        save(run, done, exhausted=True)
    run.checkpoints.wait()  # the last checkpoint is complete before the summary names it
    out = write_summary(run, done, "complete")
    board = (f"\n  tensorboard tensorboard --logdir {run.path / 'tensorboard'}"
             if "tensorboard" in run.cfg.trackers() else "")
    run.say(f"distseq: done: step={out['step']} eval/accuracy={run.evaluator.latest['eval/accuracy']:.4f} "
            f"samples/s={out['samples_per_sec']:.0f} tokens/s={out['tokens_per_sec']:.0f}\n"
            f"  summary     {run.path / 'summary.json'}\n"
            f"  checkpoint  {run.checkpoints.newest}{board}")
    return out


def write_summary(run: Run, done: int, status: str) -> dict:
    progress, layout, seconds = run.progress, run.layout, run.clock.train_seconds()
    progress.tokens = run.logger.tokens_total  # the last step was logged or saved: nothing is pending
    extra = {**throughput((done - progress.first_step) * layout.global_batch, progress.tokens, seconds,
                          run.flops_per_token, run.accelerator.device, run.accelerator.num_processes),
             "checkpoint": str(run.checkpoints.newest), "micro_batch": layout.micro_batch, "sharding": run.sharding,
             "global_batch": layout.global_batch, "start_step": progress.first_step,
             "skipped_steps": progress.skipped_steps, "status": status,
             "resumed_from": str(run.resumed_from) if run.resumed_from else None,
             "train_seconds": seconds, "steps_per_sec": (done - progress.first_step) / max(seconds, 1e-9),
             "eval_history": progress.eval_history, "config_changes": progress.config_history[1:]}
    if progress.tokens_estimated_before is not None:
        extra["tokens_note"] = (f"tokens before step {progress.tokens_estimated_before} are estimated from the mean "
                                f"length: that checkpoint predates token counting")
    if run.logger.ranks.latest:
        extra.update(run.logger.ranks.latest)  # the last log step's comparison of the ranks
    if "first_step" in run.startup.phases:
        extra["startup"] = run.startup.report()
    if run.profiler.result:
        extra["profile"] = run.profiler.result
    if run.accounting:
        extra["data_accounting"] = run.accounting.report()
    out = summary(
        step=done, samples=done * layout.global_batch, wall_seconds=run.clock.wall_seconds(),
        eval_metrics=run.evaluator.latest, precision=run.precision.name, accelerator=run.accelerator,
        model=run.model_name, task=run.cfg.data.task, extra=extra,
    )
    run.write("summary.json", out)
    return out
