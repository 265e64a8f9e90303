"""``distseq eval``: a checkpoint on held-out data (or on --data-files), on 1 or N processes.

A reader of the run: it takes no lock of the run directory and never fails because a running job's
--keep-last deleted a checkpoint under it (the main process reads the weights once, as verified, and
shares them). Each rank evaluates its own share and every sample counts exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from distseq.checkpoint.format import WEIGHTS, newest_verified, read_meta
from distseq.data.index import FileSource, check_same_everywhere
from distseq.data.stream import eval_batches
from distseq.distributed.accelerator import fresh_accelerator, print0
from distseq.distributed.agree import main_decides
from distseq.errors import CheckpointError
from distseq.fsio import write_json
from distseq.inference.export import model_from_checkpoint
from distseq.registry import TASKS
from distseq.training.datasets import held_out, needs_files, open_data_files
from distseq.training.evaluation import eval_batch_size, evaluate


def eval_command(run_dir: str, checkpoint: Optional[str], eval_size: Optional[int],
                 data_files: Optional[str], output: Path) -> dict:
    """The newest intact (or the given) checkpoint of ``run_dir`` on held-out data; writes ``output``."""
    accelerator = fresh_accelerator()
    try:
        return _eval_checkpoint(accelerator, run_dir, checkpoint, eval_size, data_files, output)
    finally:
        accelerator.end_training()  # a gloo group left to the interpreter's exit can abort (SIGABRT) the process


def _eval_checkpoint(accelerator, run_dir: str, checkpoint: Optional[str], eval_size: Optional[int],
                     data_files: Optional[str], output: Path) -> dict:
    def choose():
        if checkpoint:
            return checkpoint, read_meta(Path(checkpoint), keep=(WEIGHTS,))
        path, meta, files = newest_verified(Path(run_dir), lambda line: print0(accelerator, line), (WEIGHTS,))
        if path is None:
            raise CheckpointError(f"no intact checkpoint under {Path(run_dir) / 'checkpoints'}")
        return str(path), (meta, files)

    chosen, verified = main_decides(accelerator, choose)
    path = Path(chosen)
    model, cfg, meta = model_from_checkpoint(path, verified)
    model.to(accelerator.device)
    task, spec = TASKS[cfg.data.task], cfg.task_spec()
    rank, world = accelerator.process_index, accelerator.num_processes
    started = time.perf_counter()
    if data_files:
        index = open_data_files(cfg, data_files, quiet=not accelerator.is_main_process)
        check_same_everywhere(index, accelerator)
        expected = index.rows  # every sample once, in the files' order
        batches = eval_batches(FileSource(index, None, spec.variable), rank, world, expected,
                               eval_batch_size(task, spec))
        what = data_files
    else:
        files = open_data_files(cfg, cfg.data.data_files, quiet=True) if needs_files(cfg) else None
        batches, expected, what = held_out(cfg, files, rank, world, eval_batch_size(task, spec), eval_size)
    metrics = evaluate(accelerator, model, task, batches, expected, spec.variable)
    result = {
        "loss": metrics["eval/loss"],
        "accuracy": metrics["eval/accuracy"],
        **{key: metrics[f"eval/{key}"] for key in ("sequence_accuracy", "perplexity") if f"eval/{key}" in metrics},
        "samples": metrics["eval/samples"],
        "seconds": time.perf_counter() - started,
        "checkpoint": str(path),
        "step": meta["step"],
        "world_size": world,
        "data": what,
    }
    if accelerator.is_main_process:
        write_json(output, result)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()), flush=True)
    return result
