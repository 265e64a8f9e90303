"""Everything a run does before its first step: ``build_run`` returns the ``Run`` the loop steps through.

In order: CPU threads; the options checked once, for the launch's world size; the data files indexed
(every row checked before anything of the run is written); the model built (or the user's taken);
the precision probed on that very model; the Accelerator (the process group: every rank waits here for
the slowest); the run directory prepared and locked; the model sharded or wrapped and the optimizer
built; the checkpoint resumed; the data pipeline started at the run's step; then the components that
own their timing: the step logger, the evaluator, the checkpoint manager and the profiler. Each phase
is timed (``StartupTimeline``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from accelerate import Accelerator
from torch import nn

from distseq.checkpoint.manager import CheckpointManager, RngState
from distseq.checkpoint.rundir import RunDir, open_run_dir
from distseq.config import TrainConfig
from distseq.config.threshold import Threshold
from distseq.config.world import launch_world_size, resolve_sharding
from distseq.data.index import check_same_everywhere
from distseq.data.stream import Layout
from distseq.data.verify import Accounting
from distseq.distributed.accelerator import (
    build_accelerator,
    check_world_size,
    ddp_without_buffer_notice,
    local_device,
    needs_buffer_broadcast,
    print0,
    set_cpu_threads,
)
from distseq.distributed.agree import any_rank
from distseq.distributed.sharding import blocks, quiet_fsdp_warnings, shard_model
from distseq.errors import RunIOError
from distseq.fsio import write_json
from distseq.models import build_model
from distseq.models.flops import flops_per_token, state_size
from distseq.ops.failpoints import pause_point
from distseq.ops.hangs import HangReport
from distseq.ops.signals import StopSignals
from distseq.ops.startup import StartupTimeline
from distseq.registry import REPLACED, TASKS, replacements_in
from distseq.tasks import Task, TaskSpec
from distseq.training.agreement import StepAgreement
from distseq.training.compiled import CompileWatch, compile_model
from distseq.training.datasets import Index, held_out, open_files
from distseq.training.evaluation import Evaluator, eval_batch_size
from distseq.training.feed import TrainingFeed
from distseq.training.metrics import StepLogger, TrainingClock
from distseq.training.optim import apply_options, build_optimizer
from distseq.training.precision import Precision, resolve_precision
from distseq.training.preflight import preflight
from distseq.training.profiling import StepProfiler
from distseq.training.progress import Progress
from distseq.training.recompute import check_recompute, recompute_blocks
from distseq.training.resume import resume
from distseq.training.trackers import start_tracking, trackers


@dataclass(kw_only=True)
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
    feed: TrainingFeed
    config: dict  # the resolved config, as config.json and every checkpoint record it
    start: int  # the first step this process trains
    resumed_from: Optional[Path] = None
    logger: Optional[StepLogger] = None
    evaluator: Optional[Evaluator] = None
    profiler: Optional[StepProfiler] = None
    accounting: Optional[Accounting] = None
    clock: Optional[TrainingClock] = None
    nothing_left: Optional[dict] = None  # a finished run started again: its summary
    files: Optional[Index] = None  # indexed --data-files
    model_name: str = ""  # --model, or the class of a module given to train(model=...)
    flops_per_token: float = 0.0  # training FLOPs per token of this model (models/flops.py)
    sharding: str = "none"  # --sharding as it applies: none, ddp or fsdp
    sharded: List[str] = field(default_factory=list)  # what was done to the model: recompute, compile, fsdp
    compiled: Optional[CompileWatch] = None  # under --compile: its phase and the recompilations after it
    startup: StartupTimeline = field(default_factory=StartupTimeline)  # process start to the first step
    replaced: dict = field(default_factory=dict)  # the task and model names a plugin replaced, as recorded
    stop_at: Optional[Threshold] = None  # --stop-at, parsed
    parameters: int = 0  # of the model as built (whole, before sharding)
    state_size: Optional[int] = None  # numbers one layer carries from token to token (None: the model does not say)
    agreement: StepAgreement = field(default_factory=StepAgreement)  # the steps' agreed flags the host has not read

    @property
    def path(self) -> Path:
        return self.run_dir.path

    def say(self, line: str) -> None:
        print0(self.accelerator, line)

    def model_figures(self) -> dict:
        """What summary.json says of the model: its size, its training FLOPs per token (in ``throughput``) and
        the state one layer carries from token to token at this sequence length."""
        return {"parameters": self.parameters, "state_size_per_layer": self.state_size}

    def model_figures_line(self) -> str:
        state = "" if self.state_size is None else f" state/layer={self.state_size}"
        return f"parameters={self.parameters} flops/token={self.flops_per_token:.3g}{state}"

    def write_agreed(self, files: dict) -> None:
        """Run files written by the main process while the others wait for it: every rank learns the
        outcome, so a failed write is the same one line everywhere, never a hang."""
        problem = None
        try:
            for name, payload in files.items():
                self.write(name, payload)
        except RunIOError as error:
            problem = error
        if any_rank(self.accelerator, problem is not None) and problem is None:
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


def build_run(cfg: TrainConfig, model: Optional[nn.Module], signals: StopSignals, cleanup: contextlib.ExitStack,
              hangs: Optional[HangReport] = None, groups: Optional[list] = None) -> Run:
    """Everything before the first step; ``cleanup`` ends the trackers and releases the run dir;
    ``hangs`` learns where a failed collective's stacks go; ``groups`` receives the process group, for
    the caller to release after the run."""
    startup = StartupTimeline()
    startup.mark("imports")  # the interpreter, torch, accelerate, distseq
    run = _join(cfg, model, signals, cleanup, startup, hangs, groups)
    startup.mark("run_dir_and_optimizer")
    resume(run)
    startup.mark("resume")
    if run.nothing_left is None:
        _begin(run, cleanup)
        startup.mark("data_pipeline")
    return run


def _join(cfg: TrainConfig, model: Optional[nn.Module], signals: StopSignals, cleanup: contextlib.ExitStack,
          startup: StartupTimeline, hangs: Optional[HangReport], groups: Optional[list]) -> Run:
    """The options checked, the data indexed, the model built and probed, the process group joined, the run
    directory prepared, the model sharded or wrapped with its optimizer, the checkpoint manager."""
    set_cpu_threads()
    world = launch_world_size()
    cfg.validate(world)  # the launch's count; check_world_size confirms it
    t = cfg.train
    task, spec = TASKS[cfg.data.task], cfg.task_spec()
    files = open_files(cfg)  # every row checked before anything of the run is written
    startup.mark("data_index")
    torch.manual_seed(t.seed)
    model_name = cfg.model.kind if model is None else f"{type(model).__module__}.{type(model).__qualname__}"
    model = model if model is not None else build_model(cfg.model, task, spec)
    preflight(cfg, model, model_name, local_device())  # a plugin's wrong shapes: one line, not a traceback
    check_recompute(model, t.activation_checkpointing, model_name, local_device())
    startup.mark("model")
    sharding = resolve_sharding(t.sharding, world)
    # probes this very model, as it will run: under FSDP2's policy when sharded
    precision = resolve_precision(t.precision, cfg, local_device(), model, sharded=sharding == "fsdp")
    startup.mark("precision_probe")
    # constant buffers need no broadcast at each forward, which would also make every rank wait for the
    # slowest inside the forward that the straggler report times
    accelerator = build_accelerator(cfg, precision=precision.name, sharding=sharding, log_with=trackers(cfg),
                                    broadcast_buffers=needs_buffer_broadcast(model))
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
    if run_dir.moved_aside:
        print0(accelerator, f"distseq: --overwrite: moved the earlier run in {run_dir.path} aside to "
                            f"{run_dir.moved_aside}")
    pause_point("startup")
    model_flops = flops_per_token(model, spec.seq_len)  # of the model as built, before any wrapper
    parameters = sum(p.numel() for p in model.parameters())
    state = state_size(model, spec.seq_len)
    if t.compile or t.activation_checkpointing != "none":  # a model given to train() is the caller's again after
        cleanup.callback(restore_forwards, [(unit, unit.__dict__.get("forward")) for unit in [model, *blocks(model)]])
    model, optimizer, scheduler, sharded = _place(model, cfg, accelerator, sharding, precision)
    layout = Layout(cfg.micro_batch_size(accelerator.num_processes), accelerator.num_processes, t.grad_accum_steps)
    config, progress = cfg.to_dict(), Progress(first_step=t.start_step)
    replaced = replacements_in(cfg.data.task, model_name)
    feed = TrainingFeed(cfg, accelerator=accelerator, layout=layout, files=files)
    checkpoints = CheckpointManager(
        cfg.checkpoint, accelerator=accelerator, run_dir=run_dir.path, max_steps=t.max_steps,
        samples_per_step=layout.global_batch, model=model, optimizer=optimizer, sharding=sharding,
        timeout_s=t.dist_timeout_s, meta={"config": config, **({"data": files.identity()} if files else {}),
                                          **({REPLACED: replaced} if replaced else {})},
        shared={"progress": progress}, per_rank={"rng": RngState(), "data": feed})
    cleanup.callback(checkpoints.close)  # a background save completes before the run dir's lock is released
    return Run(cfg=cfg, accelerator=accelerator, precision=precision, signals=signals, run_dir=run_dir, task=task,
               spec=spec, layout=layout, model=model, optimizer=optimizer, scheduler=scheduler,
               checkpoints=checkpoints, progress=progress, feed=feed, config=config, start=t.start_step,
               model_name=model_name, flops_per_token=model_flops, files=files, sharding=sharding, startup=startup,
               sharded=sharded, replaced=replaced, parameters=parameters, state_size=state,
               compiled=CompileWatch() if t.compile else None,
               stop_at=Threshold.parse(t.stop_at, task.head) if t.stop_at else None)


def _place(model: nn.Module, cfg: TrainConfig, accelerator: Accelerator, sharding: str, precision: Precision):
    """The model with activation checkpointing, compiled, then sharded (FSDP2, before the optimizer exists: it
    must hold the shards) or wrapped (DDP) (torchtitan's order), its optimizer and schedule; and the lines
    saying what was done to it."""
    t = cfg.train
    said = [recompute_blocks(model, t.activation_checkpointing)]
    if t.compile:
        said.append(compile_model(model, per_block=sharding == "fsdp", backend=t.compile_backend))
    if sharding == "fsdp":
        said.append(shard_model(model, precision.name, accelerator.device))
        quiet_fsdp_warnings()
    sharded = [line for line in said if line]
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.train.max_steps)
    if sharding == "fsdp":
        optimizer = accelerator.prepare(optimizer)
    else:
        with ddp_without_buffer_notice():
            model, optimizer = accelerator.prepare(model, optimizer)  # the DataLoader never is (invariant 4)
    return model, optimizer, scheduler, sharded


def restore_forwards(saved: list) -> None:
    """Put back the ``forward`` each module held before --compile or --activation-checkpointing replaced it."""
    for unit, forward in saved:
        if forward is None:
            unit.__dict__.pop("forward", None)
        else:
            unit.forward = forward


def _begin(run: Run, cleanup: contextlib.ExitStack) -> None:
    """From the step the run starts at: the options in force, the data, config.json, the trackers, the start
    lines, and the components that own their timing (step logger, evaluator, profiler, data accounting)."""
    cfg, accelerator, layout, t = run.cfg, run.accelerator, run.layout, run.cfg.train
    apply_options(run.optimizer, run.scheduler, cfg.optim, run.start)  # O(1) at any step; the options in force now
    if not run.progress.config_history:
        run.progress.config_history.append({"step": run.start, "config": run.config})
    run.feed.start(run.start)
    for kind, record in run.replaced.items():
        run.say(f"distseq: {kind} {record['name']!r} is {record['by']}, replacing {record['instead_of']}")
    recorded = {**run.config, REPLACED: run.replaced} if run.replaced else run.config
    run.write_agreed({"config.json": recorded, "config_history.json": run.progress.config_history})
    # a fresh start over what a run killed before its first checkpoint logged: hide those curves
    purge = run.start + 1 if run.resumed_from else (1 if (run.path / "tensorboard").is_dir() else None)
    start_tracking(accelerator, cfg.flat(), purge_step=purge, timeout_s=cfg.log.tracker_timeout_s)
    run.say(f"distseq: world_size={accelerator.num_processes} backend={accelerator.state.backend or 'none'} "
            f"device={accelerator.device} sharding={run.sharding} precision={run.precision.name} "
            f"({run.precision.reason}) micro_batch={layout.micro_batch} grad_accum={layout.grad_accum} "
            f"global_batch={layout.global_batch} run_dir={run.path}")
    run.say(f"distseq: model={run.model_name} {run.model_figures_line()}")
    for line in run.sharded:
        run.say(f"distseq: {line}")
    if run.files is not None:
        trained = run.feed.source_size()
        run.say(f"distseq: data: {run.files.describe()}; one epoch = {trained / layout.global_batch:.6g} steps of "
                f"{layout.global_batch}, reshuffled each epoch" +
                (f"; {run.files.rows - trained} held out" if trained < run.files.rows else ""))
    rank, world = accelerator.process_index, accelerator.num_processes
    run.clock = TrainingClock(run.progress.train_seconds, run.progress.wall_seconds)  # evaluation, saves pause it
    run.logger = StepLogger(cfg.log, accelerator=accelerator, max_steps=t.max_steps, global_batch=layout.global_batch,
                            start=run.start, clock=run.clock, flops_per_token=run.flops_per_token,
                            per_step=run.task.head == "per-step", tokens_before=run.progress.tokens)
    cleanup.callback(run.logger.close)
    batches, expected, _ = held_out(cfg, run.files, rank, world, eval_batch_size(run.task, run.spec))
    run.evaluator = Evaluator(t, accelerator=accelerator, model=run.model, task=run.task, batches=batches,
                              expected=expected, variable_length=run.spec.variable, clock=run.clock,
                              history=run.progress.eval_history, emit=run.logger.emit,
                              stop_at=run.stop_at)
    run.profiler = StepProfiler(cfg.profile_range(), run.path, rank, accelerator.device)
    run.accounting = Accounting(run.start * layout.global_batch, world) if t.verify_data else None
