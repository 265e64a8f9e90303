"""Held-out evaluation, during training and as ``distseq eval`` on 1 or N processes.

Each rank evaluates its own share; ``gather_for_metrics`` collects per-sample results and padding
rows (index -1) are dropped, so every sample counts exactly once whatever the process count.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from accelerate import Accelerator

from .errors import DataAccountingError
from .tasks import Batch, Task

EVAL_BATCH = 1024  # held-out samples per forward pass, at most
EVAL_BATCH_BYTES = 2**28  # and at most this much input and float32 output per forward pass


def eval_batch_size(task: Task, spec) -> int:
    """Held-out samples per forward pass: EVAL_BATCH, fewer where each sample's logits are large (a
    per-step head over a big vocabulary at seq 2,048 has 64 MiB of logits per sample)."""
    outputs = task.num_outputs(spec) * (spec.seq_len if task.head == "per-step" else 1)
    per_sample = 4 * outputs + spec.seq_len * task.input_bytes(spec)
    return max(1, min(EVAL_BATCH, EVAL_BATCH_BYTES // per_sample))


def forward(model, batch: Batch, device: torch.device, variable_length: bool) -> torch.Tensor:
    x = batch["x"].to(device, non_blocking=True)  # (b, T, F) features or (b, T) token ids
    return model(x, batch["lengths"] if variable_length else None)  # lengths stay on the CPU for packing


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, task: Task, batches: List[Batch], expected: Optional[int],
             variable_length: bool) -> Dict[str, float]:
    """Loss and accuracy over every real sample of ``batches`` (exactly ``expected`` when given); for a
    per-step head also the fraction of samples with every answer right (``eval/sequence_accuracy``)."""
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    results = []
    for batch in batches:
        with accelerator.autocast():
            logits = forward(model, batch, accelerator.device, variable_length)
        y = batch["y"].to(accelerator.device)
        per_sample = torch.stack([task.loss(logits, y), *task.scores(logits, y)], 1)  # (n, 3): loss, correct, solved
        keep = accelerator.gather_for_metrics(batch["index"].to(accelerator.device)) >= 0  # padding rows are -1
        results.append(accelerator.gather_for_metrics(per_sample)[keep])  # (valid, 3)
    model.train(was_training)
    loss, correct, solved = torch.cat(results).double().unbind(1)
    if expected is not None and loss.numel() != expected:
        raise DataAccountingError(f"evaluation saw {loss.numel()} samples, expected {expected}")
    out = {"eval/loss": loss.mean().item(), "eval/accuracy": correct.mean().item()}
    if task.head == "per-step":
        out["eval/sequence_accuracy"] = solved.mean().item()
    out["eval/samples"] = loss.numel()
    return out


class Evaluator:
    """Held-out evaluation during training: when (every --eval-every steps and the last), on what (each
    rank's share of the held-out set) and the record (step, training seconds, metrics in ``history``).
    Evaluation time is not training time: it pauses the clock."""

    def __init__(self, accelerator: Accelerator, model, task: Task, batches: List[Batch], expected: int,
                 variable_length: bool, every: int, max_steps: int, clock, history: List[dict], emit):
        self.accelerator, self.model, self.task, self.batches = accelerator, model, task, batches
        self.expected, self.variable_length, self.every, self.max_steps = expected, variable_length, every, max_steps
        self.clock, self.history, self.emit = clock, history, emit
        self.latest: Dict[str, float] = {}

    def due(self, done: int) -> bool:
        return done == self.max_steps or bool(self.every and done % self.every == 0)

    def run(self, done: int) -> Dict[str, float]:
        from .metrics import log_line

        at = self.clock.train_seconds()
        with self.clock.pause():
            self.latest = evaluate(self.accelerator, self.model, self.task, self.batches, self.expected,
                                   self.variable_length)
            self.accelerator.log(self.latest, step=done)
            self.emit(log_line(done, self.max_steps, self.latest))
        self.history.append({"step": done, "train_seconds": at, **self.latest})
        return self.latest


def eval_command(run_dir: str, checkpoint: Optional[str], eval_size: Optional[int],
                 data_files: Optional[str], output: Path) -> dict:
    """``distseq eval``: the newest intact (or the given) checkpoint on held-out data; writes ``output``.

    A reader of the run: it takes no lock of the run directory and never fails because a running job's
    --keep-last deleted a checkpoint under it (the main process reads the weights once, as verified, and
    shares them). ``data_files`` are indexed like training's (the index's cache and its lock)."""
    from .runtime import fresh_accelerator

    accelerator = fresh_accelerator()
    try:
        return _eval_checkpoint(accelerator, run_dir, checkpoint, eval_size, data_files, output)
    finally:
        accelerator.end_training()  # a gloo group left to the interpreter's exit can abort (SIGABRT) the process


def _eval_checkpoint(accelerator, run_dir: str, checkpoint: Optional[str], eval_size: Optional[int],
                     data_files: Optional[str], output: Path) -> dict:
    from accelerate.utils import broadcast_object_list

    from .checkpoint import newest_verified, read_meta
    from .data import SampleSource, eval_batches
    from .errors import CheckpointError
    from .export import WEIGHTS, model_from_checkpoint
    from .file_index import FileSource, check_same_everywhere, open_index
    from .files import resolve_files
    from .io import write_json
    from .runtime import print0
    from .registry import TASKS

    chosen: list = [None, None, ""]  # path, (meta, files), error
    if accelerator.is_main_process:
        try:
            if checkpoint:
                chosen[:2] = checkpoint, read_meta(Path(checkpoint), keep=(WEIGHTS,))
            else:
                path, meta, files = newest_verified(Path(run_dir), lambda line: print0(accelerator, line), (WEIGHTS,))
                if path is None:
                    raise CheckpointError(f"no intact checkpoint under {Path(run_dir) / 'checkpoints'}")
                chosen[:2] = str(path), (meta, files)
        except CheckpointError as error:
            chosen[2] = str(error)
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    if chosen[2]:
        raise CheckpointError(chosen[2])
    path = Path(chosen[0])
    model, cfg, meta = model_from_checkpoint(path, chosen[1])
    model.to(accelerator.device)
    task, spec = TASKS[cfg.data.task], cfg.task_spec()
    rank, world = accelerator.process_index, accelerator.num_processes
    started = time.perf_counter()
    if data_files:
        from .errors import ConfigError

        if task.head == "per-step":
            raise ConfigError("--data-files", f"needs one label per sequence; this checkpoint's task {cfg.data.task} "
                                              f"has one per step")
        say = (lambda line: print(line, flush=True)) if accelerator.is_main_process else (lambda line: None)
        index = open_index(resolve_files(data_files), task, spec, cfg.data.sequence_column, cfg.data.label_column,
                           cfg.data.data_cache, say, progress=False).open()
        check_same_everywhere(index, accelerator)
        expected = index.rows  # every row once, in the files' order
        batches = eval_batches(FileSource(index, None, spec.variable), rank, world, expected, eval_batch_size(task, spec))
    else:
        expected = eval_size or cfg.data.eval_size
        source = SampleSource(cfg.data.task, spec, cfg.train.seed, cfg.data.block_size, "eval")
        batches = eval_batches(source, rank, world, expected, eval_batch_size(task, spec))
    metrics = evaluate(accelerator, model, task, batches, expected, spec.variable)
    result = {
        "loss": metrics["eval/loss"],
        "accuracy": metrics["eval/accuracy"],
        **({"sequence_accuracy": metrics["eval/sequence_accuracy"]} if "eval/sequence_accuracy" in metrics else {}),
        "samples": metrics["eval/samples"],
        "seconds": time.perf_counter() - started,
        "checkpoint": str(path),
        "step": meta["step"],
        "world_size": world,
        "data": data_files or "held-out stream",
    }
    if accelerator.is_main_process:
        write_json(output, result)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()), flush=True)
    return result
