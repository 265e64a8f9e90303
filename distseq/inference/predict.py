"""``distseq predict``: JSON lines in, one prediction per line out.

Every input line is checked before anything is written, so a bad line is an error naming it and no
output is left half-written (``--output`` is written to a temporary file and renamed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

from distseq.config import TrainConfig
from distseq.data.files import DataFileError, sequence_to_tensor
from distseq.fsio import strict_json, write_text_atomically
from distseq.registry import TASKS


def read_inputs(path: str, column: str, cfg: TrainConfig):
    """(x (N, T, F), lengths (N,)) from a JSON-lines file; DataFileError naming the line otherwise."""
    task, spec = TASKS[cfg.data.task], cfg.task_spec()
    xs, lengths = [], []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise DataFileError(f"{path}: cannot read: {error.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFileError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or column not in row:
            raise DataFileError(f"{where}: missing {column!r}")
        x, length = sequence_to_tensor(row[column], where, column, task, spec)
        xs.append(x)
        lengths.append(length)
    if not xs:
        raise DataFileError(f"{path}: no input lines")
    return torch.stack(xs), torch.tensor(lengths, dtype=torch.int64)


def random_inputs(n: int, cfg: TrainConfig):
    """The first ``n`` held-out samples (x, lengths, y)."""
    from distseq.data.stream import SampleSource

    spec = cfg.task_spec()
    batch = SampleSource(cfg.data.task, spec, cfg.train.seed, cfg.data.block_size, "eval").samples(torch.arange(n))
    lengths = batch.get("lengths", torch.full((n,), spec.seq_len, dtype=torch.int64))
    return batch["x"], lengths, batch["y"]


@torch.no_grad()
def predictions(model, x: torch.Tensor, lengths: torch.Tensor, cfg: TrainConfig, labels=None) -> List[dict]:
    from distseq.training.evaluation import eval_batch_size

    task, spec = TASKS[cfg.data.task], cfg.task_spec()
    head, variable, batch = task.head, spec.variable, eval_batch_size(task, spec)
    rows = []
    for start in range(0, x.shape[0], batch):
        out = model(x[start:start + batch], lengths[start:start + batch] if variable else None)
        for i, logits in enumerate(out):
            if head == "binary":
                row = {"probability": torch.sigmoid(logits).item(), "class": int(logits.item() > 0)}
            elif head == "regression":
                row = {"value": logits.item()}
            elif head == "classes":
                row = {"class": int(logits.argmax(-1)), "probabilities": torch.softmax(logits.float(), -1).tolist()}
            else:
                row = {"classes": logits.argmax(-1).tolist()}  # per step; the task's labelled steps matter
            if labels is not None:
                label = labels[start + i]
                row["label"] = label.tolist() if label.dim() else label.item()
            rows.append(row)
    return rows


def write_lines(rows: List[dict], output: Optional[str]) -> None:
    text = "".join(json.dumps(strict_json(row), allow_nan=False) + "\n" for row in rows)
    if output is None:
        sys.stdout.write(text)
        return
    write_text_atomically(Path(output), text)
