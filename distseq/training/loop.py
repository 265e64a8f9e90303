"""The training loop: the one place that knows the order of a step.

``train(cfg)`` = ``build_run`` (everything before the first step: ``build.py``) + ``run_loop`` (the
steps) + ``finish``. Components decide their own timing: the step logger when to log, the evaluator
when to evaluate, the checkpoint manager when to save, the profiler when to record; the loop asks
them in order. Counted in optimizer steps; each step consumes ``grad_accum_steps`` micro-batches per
rank inside ``accelerator.accumulate``. Every step all ranks agree on two flags (a non-finite loss or
gradient, a stop signal), so every rank takes the same branch; the device skips a non-finite step itself
and the host reads the flags a step later (``agreement.py``): an ordinary step never waits for the device.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from distseq.config import TrainConfig
from distseq.distributed.accelerator import is_collective_failure
from distseq.distributed.agree import any_rank, max_over_ranks
from distseq.distributed.sharding import full_value, set_gradient_sync
from distseq.errors import DataFileError, DistseqError, NonFiniteError, Stopped
from distseq.ops.failpoints import pause_point, slow_rank_seconds, strict_sync
from distseq.ops.hangs import HangReport
from distseq.ops.signals import StopSignals, exit_code, signal_name, status
from distseq.ops.slurm import request_requeue
from distseq.registry import REPLACED
from distseq.training.build import Run, build_run
from distseq.training.compiled import warm_up_reduction
from distseq.training.evaluation import forward
from distseq.training.metrics import summary, throughput
from distseq.training.optim import skip_step_where
from distseq.training.profiling import format_profile


@dataclass
class Outcome:
    """One optimizer step, on the device: nothing here has made the host wait."""

    loss: torch.Tensor  # summed over the step's samples on this rank
    correct: torch.Tensor
    solved: torch.Tensor
    tokens: int  # time steps of the step's samples on this rank, padding excluded (counted on the host)
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # () 1.0 where some rank saw a non-finite loss or gradient: no update anywhere


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


def run_loop(run: Run) -> int:
    """The steps, from the run's start to --max-steps (or until the data files run out); the last done."""
    done = run.start
    run.signals.begin_loop()
    run.clock.begin_training()
    own_work, slow_seconds = run.logger.ranks.own_work, slow_rank_seconds(run.accelerator.process_index)
    for step in range(run.start, run.cfg.train.max_steps):
        # the first two steps compile, warm up and settle; from then on an ordinary step never waits for the device
        # (--data-streaming agrees every step on whether the files ran out; --profile-steps times by waiting)
        strict_sync(step > run.start + 1 and not reads_now(run, step + 1) and not run.cfg.data.data_streaming
                    and not run.cfg.log.profile_steps)
        run.profiler.begin(step)
        with run.profiler.span("data"), own_work():
            micro = run.feed.next_step()
            if slow_seconds:
                time.sleep(slow_seconds)
        if micro is None:  # every rank agreed the data files are used up
            break
        if run.compiled is not None and step == run.start:
            warm_up(run, micro[0])
        done = step + 1
        outcome = train_step(run, micro, done)
        if done == run.start + 1:
            run.startup.mark("first_step")
            run.say(run.startup.line())
        with run.profiler.span("logging"):
            stop = settle(run, done, reads_now(run, done))
            if stop:  # this step is saved next: its own flags are read first, so what is saved is exact
                strict_sync(False)  # saving on a signal waits for the device, as it must
                stop = settle(run, done, now=True) or stop
            record(run, micro, done, outcome, stop)
        if run.profiler.end(done) and run.accelerator.is_main_process:
            run.logger.emit(format_profile(run.profiler.result))
            run.write("profile.json", run.profiler.result)
        solved = False
        if run.evaluator.due(done):
            run.evaluator.run(done)
            solved = run.evaluator.reached()
        if solved:  # the run is complete here: a stop signal at this step changes nothing
            record_stop_at(run, done)
        elif stop:
            pause_point("stopping")
        if run.checkpoints.due(done, bool(stop) or solved):
            save(run, done)
        if solved:
            break
        if stop:
            end_on_signal(run, done, stop)
    strict_sync(False)
    settle(run, done, now=True)  # the data ran out: the last step's flags (a stop signal there changes nothing)
    return done


def warm_up(run: Run, batch: dict) -> None:
    """--compile: compile on the first micro-batch before the first step (the start-up phase ``compile``,
    outside training time); the step then runs as an eager run's would."""
    model, device = run.model, run.accelerator.device

    def run_batch() -> torch.Tensor:
        return run.task.loss(forward(model, batch, device, run.spec.variable), batch["y"].to(device)).mean()

    with run.clock.pause():
        run.compiled.warm_up(model, run_batch, warm_up_reduction(run.accelerator, model), device, run.model_name)
    run.startup.mark("compile")


def reads_now(run: Run, done: int) -> bool:
    """Whether the host waits for the device after step ``done`` anyway (a log line, an evaluation, a
    checkpoint, the last step): then every pending step's flags are read at once, so that what it
    reports or saves is exact."""
    return (run.logger.due(done) or run.evaluator.due(done) or run.checkpoints.due(done, False)
            or done == run.cfg.train.max_steps)


def settle(run: Run, done: int, now: bool) -> int:
    """Count the steps whose agreed flags are read here (skipped ones; --on-nonfinite stop raises); the
    number of a stop signal one of them carried, else 0."""
    t, progress, stop = run.cfg.train, run.progress, 0
    for verdict in run.agreement.settle(now):
        stop = stop or verdict.stop
        if not verdict.skipped:
            continue
        if t.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradient at step {verdict.step}; stopped without saving "
                                 f"(--on-nonfinite skip skips such steps)")
        progress.skipped_steps += 1
        run.logger.window.skipped += 1
        if progress.skipped_steps > math.floor(t.max_skipped_fraction * t.max_steps):
            raise NonFiniteError(
                f"{progress.skipped_steps} optimizer steps skipped for non-finite values by step {done}, more "
                f"than --max-skipped-fraction {t.max_skipped_fraction:g} of --max-steps {t.max_steps}; stopped "
                f"without saving" + (f" (kept {run.checkpoints.newest})" if run.checkpoints.newest else ""))
    return stop


def record_stop_at(run: Run, done: int) -> None:
    """--stop-at holds at ``done``: recorded in the progress (so in the checkpoint saved next and the summary)."""
    run.progress.stopped_at = run.stop_at.record(done, run.evaluator.latest)
    run.say(f"distseq: {run.stop_at.said(done, run.evaluator.latest)}: saving and ending the run")


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
    with run.profiler.span("optimizer"):
        run.scheduler.step()  # a skipped step advances the schedule too: it is a function of the step
    return outcome


def optimizer_step(run: Run, loss: torch.Tensor, correct: torch.Tensor, solved: torch.Tensor, tokens: int,
                   done: int) -> Outcome:
    """Clip, agree with every rank on non-finite values and stop signals (one all-reduce, on the device),
    then step: the fused optimizer leaves the update out where the agreed flag is set."""
    accelerator = run.accelerator
    grad_norm = full_value(accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip or math.inf))
    bad = ~torch.isfinite(loss)
    if run.precision.name != "fp16":  # under fp16 the grad scaler owns overflow: it skips those steps itself
        bad |= ~torch.isfinite(grad_norm)
    # the signal's number is filled in on the device: a tensor made from a Python number would be a copy
    # the host waits for
    flags = torch.stack([bad.float(), loss.new_full((), float(run.signals.received))])
    agreed = max_over_ranks(accelerator, flags)  # (2,) one all-reduce
    run.agreement.add(done, agreed)
    with run.logger.ranks.own_work():
        skip_step_where(run.optimizer, agreed[0])
        run.optimizer.step()
    run.logger.ranks.step_done()
    return Outcome(loss, correct, solved, tokens, grad_norm, agreed[0])


def record(run: Run, micro: list, done: int, outcome: Outcome, stop: int) -> None:
    """After a step: the log window, the data digest, the log line when due."""
    run.logger.record(outcome.loss, outcome.correct, outcome.solved, outcome.tokens, outcome.grad_norm,
                      outcome.skipped)
    if run.accounting:
        for batch in micro:
            run.accounting.window.add(batch["index"])
        if run.logger.due(done) or run.evaluator.due(done) or stop:
            run.accounting.check(run.accelerator, done * run.layout.global_batch)
    if run.logger.due(done):
        run.logger.log(done, run.scheduler.get_last_lr()[0], run.progress.skipped_steps)
        news = run.compiled.news() if run.compiled is not None else None
        if news:
            run.logger.emit(news)


def save(run: Run, done: int, exhausted: bool = False) -> None:
    with run.clock.pause():  # a touched file is hashed here: not training time
        check_files_unchanged(run, done)
    progress = run.progress
    progress.train_seconds, progress.wall_seconds = run.clock.train_seconds(), run.clock.wall_seconds()
    progress.data_exhausted = exhausted
    progress.tokens = run.logger.flush_tokens()  # every rank saves here: the all-reduce is in lockstep
    with run.clock.pause():
        run.checkpoints.save(done)


def check_files_unchanged(run: Run, done: int) -> None:
    """Before a checkpoint: the indexed files are still what was indexed, and their indexes what was built
    (every rank agrees, one all-reduce). Training reads the index, so a changed file leaves the run intact,
    but a checkpoint would claim data that the files no longer hold; a damaged index (a memory map shows
    bytes written to it) may have fed the steps since the last checkpoint. Either way: stop without saving."""
    if run.files is None:
        return
    change, remedy = run.files.changed(), "restore the file to resume, or train anew on the new data in a new --run-dir"
    damage = None if change else run.files.damaged()
    if damage:
        change, remedy = damage, "run again: distseq indexes the file again and resumes"
    if any_rank(run.accelerator, change is not None) and change is None:
        change = "a data file or its index changed (another process saw it)"
    if change:
        raise DataFileError(f"--data-files: {change} while this run trained on it; stopped at step {done} without "
                            f"saving ({run.checkpoints.kept()}): {remedy}")


def end_on_signal(run: Run, done: int, signum: int) -> None:
    """Every rank saved at ``done`` on a stop signal: write the summary and raise Stopped."""
    with run.clock.pause():  # the checkpoint's train seconds were taken at its save: nothing after counts
        run.checkpoints.wait()
        run.logger.close()
    code, name, how = exit_code(signum), signal_name(signum), status(signum)
    run.say(f"distseq: {name}: saved {run.checkpoints.newest} at step {done}; exiting {code}")
    if run.cfg.train.requeue and how == "preempted" and run.accelerator.is_main_process:
        run.say(f"distseq: {request_requeue()}")
    write_summary(run, done, how)
    raise Stopped(f"{name}: saved {run.checkpoints.newest} at step {done}", code, done)


def finish(run: Run, done: int) -> dict:
    """The run reached --max-steps, or the data files ran out first (closed at the last full step)."""
    with run.clock.pause():
        run.logger.close()
    if done < run.cfg.train.max_steps and not run.progress.stopped_at:
        if done == run.start and not run.resumed_from:
            raise DataFileError(f"--data-files hold fewer rows than one global batch ({run.layout.global_batch}) "
                                f"per step")
        run.say(f"distseq: data files used up after step {done}")
        if run.logger.pending:
            run.logger.log(done, run.scheduler.get_last_lr()[0], run.progress.skipped_steps)
        run.evaluator.run(done)
        save(run, done, exhausted=True)
    with run.clock.pause():  # the last checkpoint is complete before the summary names it; waiting is not training
        run.checkpoints.wait()
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
             "global_batch": layout.global_batch, "start_step": progress.first_step, **run.model_figures(),
             "skipped_steps": progress.skipped_steps, "status": status,
             "resumed_from": str(run.resumed_from) if run.resumed_from else None,
             "train_seconds": seconds, "steps_per_sec": (done - progress.first_step) / max(seconds, 1e-9),
             "eval_history": progress.eval_history, "config_changes": progress.config_history[1:]}
    if run.replaced:
        extra[REPLACED] = run.replaced
    if progress.stopped_at:
        extra["stopped_at"] = progress.stopped_at
    if progress.tokens_estimated_before is not None:
        extra["tokens_note"] = (f"tokens before step {progress.tokens_estimated_before} are estimated from the mean "
                                f"length: that checkpoint predates token counting")
    if run.logger.ranks.latest:
        extra.update(run.logger.ranks.latest)  # the last log step's comparison of the ranks
    if "first_step" in run.startup.phases:
        extra["startup"] = run.startup.report()
    if run.profiler.result:
        extra["profile"] = run.profiler.result
    if run.compiled is not None:
        extra["compile"] = run.compiled.report()
    if run.accounting:
        extra["data_accounting"] = run.accounting.report()
    out = summary(
        step=done, samples=done * layout.global_batch, wall_seconds=run.clock.wall_seconds(),
        eval_metrics=run.evaluator.latest, precision=run.precision.name, accelerator=run.accelerator,
        model=run.model_name, task=run.cfg.data.task, extra=extra,
    )
    run.write("summary.json", out)
    return out
