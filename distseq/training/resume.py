"""Resuming a run: the checkpoint chosen, checked against this run's options and data, restored, and
what changed since recorded; a run with nothing left to train returns its summary."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distseq.checkpoint.compat import changed_options, check_compatible
from distseq.config import option_for
from distseq.data.stream import derive_seed
from distseq.errors import CheckpointError
from distseq.registry import REPLACED, check_replacements
from distseq.training.metrics import throughput


def resume(run) -> None:
    """Restore the newest intact checkpoint (or --resume PATH) into ``run`` (a ``build.Run``): weights,
    optimizer, progress, and on the same number of processes each rank's RNG and streamed position."""
    cfg, accelerator = run.cfg, run.accelerator
    wanted = "never" if run.run_dir.moved_aside else cfg.checkpoint.resume
    path, meta = run.checkpoints.select(wanted, run.say)
    if path is None:
        return
    check_compatible(meta, run.config, path)
    check_replacements(meta.get(REPLACED), cfg.data.task, run.model_name, str(path))
    check_same_data(run, meta, path)
    if cfg.data.data_streaming and meta["world_size"] != accelerator.num_processes:
        raise CheckpointError(f"{path}: --data-streaming runs resume only on the same number of processes "
                              f"({meta['world_size']}, not {accelerator.num_processes}): the files' split depends "
                              f"on it (indexed --data-files resume on any number)")
    restored = run.checkpoints.restore(path, meta)
    if "rng" not in restored.per_rank:  # another rank count: per-rank RNG cannot carry over; one per (step, rank)
        torch.manual_seed(derive_seed(meta["config"]["train"]["seed"], meta["step"], accelerator.process_index))
    run.start, run.resumed_from = restored.step, path
    if "tokens" not in (meta.get("progress") or {}):  # written before tokens were counted: exact for fixed lengths
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
                f"the data files were used up at step {run.start}" if run.progress.data_exhausted else
                stop_at_holds(run))
    if not finished:
        run.progress.stopped_at = None  # training goes on (another --stop-at, or none): it did not stop there
    if finished:
        run.say(f"distseq: {finished}; nothing to train")
        run.nothing_left = finished_summary(run, restored)


def stop_at_holds(run) -> str:
    """Why a resumed run has nothing to train under --stop-at: the condition holds at the checkpoint's own
    evaluation (the one it stopped at, or any condition that evaluation already meets); else ''."""
    history = run.progress.eval_history
    last = history[-1] if history else None
    if run.stop_at is None or last is None or last["step"] != run.start or not run.stop_at.holds(last):
        return ""
    if not run.progress.stopped_at:
        run.progress.stopped_at = run.stop_at.record(run.start, last)
    return run.stop_at.said(run.start, last)


def check_same_data(run, meta: dict, path: Path) -> None:
    """An indexed --data-files run resumes only on the rows its checkpoint was trained on (their count and
    content hash, wherever the files lie now)."""
    if run.files is None:
        return
    then, now = meta.get("data") or {}, run.files.identity()  # check_compatible refused streamed checkpoints
    if (then.get("rows"), then.get("sha256")) != (now["rows"], now["sha256"]):
        raise CheckpointError(f"{path} was trained on other data: {then.get('rows')} rows in {then.get('files')} "
                              f"file(s), sha256 {str(then.get('sha256'))[:12]}; "
                              f"--data-files now hold {now['rows']} rows "
                              f"in {now['files']}, sha256 {now['sha256'][:12]} (restore those files, or --resume never "
                              f"in a new --run-dir)")


def finished_summary(run, restored) -> dict:
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
               "model": run.model_name, "start_step": progress.first_step, **run.model_figures(),
               **throughput(restored.samples - progress.first_step * run.layout.global_batch, progress.tokens,
                            progress.train_seconds, run.flops_per_token, run.accelerator.device,
                            run.accelerator.num_processes),
               **{k: v for k, v in (history[-1] if history else {}).items() if k.startswith("eval/")},
               "note": "rebuilt from the checkpoint: the run ended after its last checkpoint, before its summary"}
    run.write("summary.json", rebuilt)
    return rebuilt
