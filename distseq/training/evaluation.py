"""Held-out evaluation, during training and as ``distseq eval`` on 1 or N processes.

Each rank evaluates its own share; ``gather_for_metrics`` collects per-sample results and padding
rows (index -1) are dropped, so every sample counts exactly once whatever the process count.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from accelerate import Accelerator

from distseq.config import LoopConfig
from distseq.config.threshold import Threshold, eval_metrics
from distseq.distributed.agree import any_rank
from distseq.errors import DataAccountingError
from distseq.tasks import IGNORE, Batch, Task
from distseq.training.metrics import log_line

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
    with torch.compiler.set_stance("force_eager"):  # --compile's graphs are the training step's (compiled.py)
        return _evaluate(accelerator, model, task, batches, expected, variable_length)


def _evaluate(accelerator: Accelerator, model, task: Task, batches: List[Batch], expected: Optional[int],
              variable_length: bool) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    results = []
    for batch in batches:
        with accelerator.autocast():
            logits = forward(model, batch, accelerator.device, variable_length)
        y = batch["y"].to(accelerator.device)
        # a language model weighs each window by its labelled tokens: its figures are per token, as perplexity is
        weight = (y != IGNORE).sum(1).float() if task.language_model else torch.ones(len(y), device=y.device)
        per_sample = torch.stack([task.loss(logits, y), *task.scores(logits, y), weight], 1)  # (n, 4)
        keep = accelerator.gather_for_metrics(batch["index"].to(accelerator.device)) >= 0  # padding rows are -1
        results.append(accelerator.gather_for_metrics(per_sample)[keep])  # (valid, 4)
    model.train(was_training)
    loss, correct, solved, weight = torch.cat(results).double().unbind(1)
    if expected is not None and loss.numel() != expected:
        raise DataAccountingError(f"evaluation saw {loss.numel()} samples, expected {expected}")
    values = (loss, correct, solved)  # in the order eval_metrics names them (--stop-at checks those names)
    total = weight.sum().clamp(min=1)
    out = {name: ((value * weight).sum() / total).item() for name, value in zip(eval_metrics(task.head), values)}
    if task.language_model:  # the mean cross-entropy per token: its exponential is the perplexity
        out["eval/perplexity"] = math.exp(min(out["eval/loss"], 700.0))
    out["eval/samples"] = loss.numel()
    return out


class Evaluator:
    """Held-out evaluation during training: when (every --eval-every steps and the last), on what (each
    rank's share of the held-out set) and the record (step, training seconds, metrics in ``history``).
    Evaluation time is not training time: it pauses the clock."""

    def __init__(self, cfg: LoopConfig, *, accelerator: Accelerator, model, task: Task, batches: List[Batch],
                 expected: int, variable_length: bool, clock, history: List[dict], emit,
                 stop_at: Optional[Threshold] = None):
        self.accelerator, self.model, self.task, self.batches = accelerator, model, task, batches
        self.expected, self.variable_length = expected, variable_length
        self.every, self.max_steps = cfg.eval_every, cfg.max_steps
        self.clock, self.history, self.emit = clock, history, emit
        self.latest: Dict[str, float] = {}
        self.stop_at = stop_at  # --stop-at: the condition that ends the run at an evaluation

    def due(self, done: int) -> bool:
        return done == self.max_steps or bool(self.every and done % self.every == 0)

    def run(self, done: int) -> Dict[str, float]:
        at = self.clock.train_seconds()
        with self.clock.pause():
            self.latest = evaluate(self.accelerator, self.model, self.task, self.batches, self.expected,
                                   self.variable_length)
            self.accelerator.log(self.latest, step=done)
            self.emit(log_line(done, self.max_steps, self.latest))
        self.history.append({"step": done, "train_seconds": at, **self.latest})
        return self.latest

    def reached(self) -> bool:
        """Whether --stop-at holds at the latest evaluation. The metrics are gathered, the same on every rank;
        the all-reduce makes the decision one for all whatever a rank's arithmetic."""
        if self.stop_at is None or not self.latest:
            return False
        return any_rank(self.accelerator, self.stop_at.holds(self.latest))
