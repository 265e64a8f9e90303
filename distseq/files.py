"""Your own data: parquet or JSON-lines files streamed with ``datasets`` instead of a synthetic task.

Each row holds a sequence (a list of numbers, or of F-number lists) and one label. Files are read
with ``load_dataset(..., streaming=True)`` one at a time inside a generator that tags every row with
its file and row number, so a bad row is reported by name; that generator is the ``datasets``
IterableDataset handed to ``split_dataset_by_node`` (whole files per rank when the file count divides
by the world size, else every W-th row). Its ``state_dict()`` is the resume state.

Files are finite and ranks may hold different row counts, so every step the ranks agree (one
all-reduce) whether each of them still has a full step of rows; the first rank to run dry ends
training for all, and the rows left over on the others are not used. A partial last micro-batch is
dropped. Rows are read in-process: their order and the resume state stay exact.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
from pathlib import Path
from typing import Iterator, List, Optional

import torch
from accelerate import Accelerator
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from .errors import ConfigError, DataFileError
from .tasks import Batch, Task, TaskSpec

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def resolve_files(pattern: str) -> List[str]:
    """Expand ``--data-files`` (paths or globs, comma-separated) to a sorted, checked list of files."""
    files: List[str] = []
    for part in filter(None, (p.strip() for p in pattern.split(","))):
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise ConfigError("--data-files", f"no such file: {part}")
        files += matches
    if not files:
        raise ConfigError("--data-files", "no files given")
    suffixes = {Path(f).suffix for f in files}
    if not suffixes <= FORMATS.keys() or len({FORMATS[s] for s in suffixes}) != 1:
        raise ConfigError("--data-files", f"files must all be .jsonl/.json or all .parquet (got {', '.join(sorted(suffixes))})")
    return files


def _format(files: List[str]) -> str:
    return FORMATS[Path(files[0]).suffix]


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs its own copy of a parse error; ours names the file in one line instead."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _parse_error(path: str, error: Exception) -> DataFileError:
    return DataFileError(f"{path}: cannot parse: {str(error).splitlines()[0]} (rows count from 0)")


def _file_rows(files: List[str], data_format: str) -> Iterator[dict]:
    for path in files:
        rows = load_dataset(data_format, data_files=[path], streaming=True, split="train")
        try:
            with _quiet_datasets():
                for row_number, row in enumerate(rows):
                    yield {"file": path, "row": row_number, "data": row}
        except Exception as error:  # a parse error deep inside pyarrow, which names the row
            raise _parse_error(path, error) from None


def _has_rows(path: str) -> bool:
    """Whether a file holds at least one row: parquet from its footer, JSON lines from the first
    non-blank byte (cheap for any size)."""
    if _format([path]) == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows > 0
        except Exception as error:  # not a parquet file: one line naming it
            raise ConfigError("--data-files", f"{path} is not a readable parquet file: {str(error).splitlines()[0]}") from None
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            if chunk.strip():
                return True
    return False


def check_files(files: List[str], sequence_column: str, label_column: str) -> None:
    """Every file has rows, and the first row of the first file has both columns (say which exist if not)."""
    for path in files:
        if not _has_rows(path):
            raise ConfigError("--data-files", f"{path} has no rows (every file of --data-files must hold some)")
    try:
        with _quiet_datasets():
            first = next(iter(load_dataset(_format(files), data_files=files[:1], streaming=True, split="train")))
    except StopIteration:
        raise ConfigError("--data-files", f"{files[0]} has no rows") from None
    except Exception as error:
        raise ConfigError("--data-files", str(_parse_error(files[0], error))) from None
    for option, column in (("--sequence-column", sequence_column), ("--label-column", label_column)):
        if column not in first:
            raise ConfigError(option, f"column {column!r} is not in {files[0]} (columns: {', '.join(first)})")


def sequence_to_tensor(sequence, where: str, column: str, task: Task, spec: TaskSpec):
    """One sequence -> (x (T, F) zero-padded, length); DataFileError naming ``where`` otherwise. A token
    task's sequence is a list of token ids -> (x (T,) int64, length)."""
    if task.tokens:
        return _tokens_to_tensor(sequence, where, column, task, spec)
    try:
        x = torch.tensor(sequence, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise DataFileError(f"{where}: {column!r} is not a list of numbers") from None
    features = task.num_features(spec)
    if x.dim() == 1 and features == 1:
        x = x[:, None]
    if x.dim() != 2 or x.shape[1] != features:
        raise DataFileError(f"{where}: {column!r} must be a list of numbers" if features == 1
                            else f"{where}: each step of {column!r} must hold {features} numbers")
    if not torch.isfinite(x).all():
        raise DataFileError(f"{where}: {column!r} holds a non-finite number")
    length = x.shape[0]
    if not spec.min_seq_len <= length <= spec.seq_len:
        allowed = f"{spec.seq_len}" if not spec.variable else f"{spec.min_seq_len}..{spec.seq_len}"
        raise DataFileError(f"{where}: sequence length {length}, expected {allowed} (--seq-len/--min-seq-len)")
    padded = torch.zeros(spec.seq_len, features)
    padded[:length] = x
    return padded, length


def _tokens_to_tensor(sequence, where: str, column: str, task: Task, spec: TaskSpec):
    vocab = task.vocab(spec)
    if not isinstance(sequence, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in sequence):
        raise DataFileError(f"{where}: {column!r} must be a list of integer token ids")
    if any(not 0 <= t < vocab for t in sequence):
        raise DataFileError(f"{where}: {column!r} holds a token id outside [0, {vocab}) (--vocab-size)")
    length = len(sequence)
    if not spec.min_seq_len <= length <= spec.seq_len:
        allowed = f"{spec.seq_len}" if not spec.variable else f"{spec.min_seq_len}..{spec.seq_len}"
        raise DataFileError(f"{where}: sequence length {length}, expected {allowed} (--seq-len/--min-seq-len)")
    padded = torch.zeros(spec.seq_len, dtype=torch.int64)
    padded[:length] = torch.tensor(sequence, dtype=torch.int64)
    return padded, length


def row_to_sample(row: dict, sequence_column: str, label_column: str, task: Task, spec: TaskSpec):
    """One row -> (x (T, F) zero-padded, length, y); DataFileError naming the file and row otherwise."""
    where = f"{row['file']}: row {row['row']} (from 0)"
    data = row["data"]
    sequence, label = data.get(sequence_column), data.get(label_column)
    if sequence is None or label is None:
        missing = sequence_column if sequence is None else label_column
        raise DataFileError(f"{where}: missing {missing!r}")
    x, length = sequence_to_tensor(sequence, where, sequence_column, task, spec)
    if not isinstance(label, (int, float)) or isinstance(label, bool) or not math.isfinite(label):
        raise DataFileError(f"{where}: {label_column!r} is not a number ({label!r})")
    if task.head == "binary" and label not in (0, 1):
        raise DataFileError(f"{where}: {label_column!r} must be 0 or 1 for --task {task.name} (got {label!r})")
    if task.head == "classes":
        classes = task.num_outputs(spec)
        if label != int(label) or not 0 <= label < classes:
            raise DataFileError(f"{where}: {label_column!r} must be a class in 0..{classes - 1} for --task "
                                f"{task.name} (got {label!r})")
        return x, length, int(label)
    return x, length, float(label)


class FileStream:
    """Micro-batches of one rank's rows, in order, with the dataset's own resume state."""

    def __init__(self, files: List[str], sequence_column: str, label_column: str, task: Task, spec: TaskSpec,
                 rank: int, world_size: int, micro_batch: int):
        dataset = IterableDataset.from_generator(_file_rows, gen_kwargs={"files": files, "data_format": _format(files)})
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.columns = (sequence_column, label_column)
        self.task, self.spec, self.micro_batch = task, spec, micro_batch
        self._rows: Optional[Iterator[dict]] = None

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._rows = None

    def next_micro_batch(self, partial: bool = False) -> Optional[Batch]:
        """b rows as a batch; None when fewer than b remain (dropped), unless ``partial`` (then None at the end)."""
        if self._rows is None:
            self._rows = iter(self.dataset)
        samples = []
        for row in self._rows:
            samples.append(row_to_sample(row, *self.columns, self.task, self.spec))
            if len(samples) == self.micro_batch:
                break
        if not samples or (len(samples) < self.micro_batch and not partial):
            return None
        xs, lengths, ys = zip(*samples)
        y_type = torch.int64 if self.task.head == "classes" else torch.float32
        batch = {"x": torch.stack(xs), "y": torch.tensor(ys, dtype=y_type)}  # (b, T, F), (b,)
        batch["index"] = torch.zeros(len(samples), dtype=torch.int64)  # a real row (padding rows carry -1)
        if self.spec.variable:
            batch["lengths"] = torch.tensor(lengths, dtype=torch.int64)
        return batch


class FileFeed:
    """Finite files: every step, all ranks agree (one all-reduce) whether each still has a full step."""

    CONTINUE, EXHAUSTED, FAILED = 0, 1, 2

    def __init__(self, stream: FileStream, grad_accum: int, accelerator: Accelerator):
        self.stream, self.grad_accum, self.accelerator = stream, grad_accum, accelerator

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def next_step(self) -> Optional[List[Batch]]:
        status, error, step = self.CONTINUE, None, []
        try:
            while status == self.CONTINUE and len(step) < self.grad_accum:
                batch = self.stream.next_micro_batch()
                if batch is None:
                    status = self.EXHAUSTED
                else:
                    step.append(batch)
        except DataFileError as failure:
            status, error = self.FAILED, failure
        flag = torch.tensor(status, device=self.accelerator.device)
        agreed = int(self.accelerator.reduce(flag, "max"))
        if agreed == self.FAILED:
            raise error or DataFileError("another process could not read its data files (its message names the row)")
        return step if agreed == self.CONTINUE else None


def file_eval_batches(stream: FileStream, accelerator: Accelerator, batch_size: int) -> list:
    """All of this rank's rows as batches of ``batch_size``, padded (index -1) so that every rank holds
    the same number of equally shaped batches for the gathers of evaluation."""
    batches = []
    while (batch := stream.next_micro_batch(partial=True)) is not None:
        batches.append(batch)
    count = int(accelerator.reduce(torch.tensor(len(batches), device=accelerator.device), "max"))
    template = batches[0] if batches else None
    if template is None:  # a rank without rows still joins every gather
        spec, features = stream.spec, stream.task.num_features(stream.spec)
        template = {"x": torch.zeros(1, spec.seq_len, features), "y": torch.zeros(1, dtype=torch.int64 if stream.task.head == "classes" else torch.float32), "index": torch.zeros(1, dtype=torch.int64)}
        if spec.variable:
            template["lengths"] = torch.full((1,), spec.seq_len, dtype=torch.int64)
    padded = []
    for i in range(count):
        batch = batches[i] if i < len(batches) else {k: v[:0] for k, v in template.items()}
        missing = batch_size - batch["x"].shape[0]
        if missing:
            filler = {k: v[:1].expand(missing, *v.shape[1:]) for k, v in template.items()}
            filler["index"] = torch.full((missing,), -1, dtype=torch.int64)
            batch = {k: torch.cat([batch[k], filler[k]]) for k in template}
        padded.append(batch)
    return padded
