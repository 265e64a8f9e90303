"""``--data-streaming``: the user's files read once, in order, without an index.

For data that does not fit on local disk. Files are read with ``load_dataset(..., streaming=True)``
one at a time inside a generator that tags every row with its file and row number, so a bad row is
reported by name; that generator is the ``datasets`` IterableDataset handed to
``split_dataset_by_node`` (whole files per rank when the file count divides by the world size, else
every W-th row). Its ``state_dict()`` is the resume state, so a run resumes only on the same number
of processes, and a resume re-reads the current file up to its position.

Files are finite and ranks may hold different row counts, so every step the ranks agree (one
all-reduce) whether each of them still has a full step of rows; the first rank to run dry ends
training for all, and the rows left over on the others are not used. A partial last micro-batch is
dropped. Rows are read in-process: their order and the resume state stay exact.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch
from accelerate import Accelerator
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from distseq.data.files import file_format, row_to_sample
from distseq.distributed.agree import max_over_ranks
from distseq.errors import DataFileError
from distseq.ops.quiet import quiet_logger
from distseq.tasks import Batch, Task, TaskSpec


def quiet_datasets():
    """datasets logs its own copy of a parse error; ours names the file in one line instead."""
    return quiet_logger("datasets")


def parse_error(path: str, error: Exception) -> DataFileError:
    return DataFileError(f"{path}: cannot parse: {str(error).splitlines()[0]} (rows count from 0)")


def _file_rows(files: List[str]) -> Iterator[dict]:
    for path in files:
        rows = load_dataset(file_format(path), data_files=[path], streaming=True, split="train")
        try:
            with quiet_datasets():
                for row_number, row in enumerate(rows):
                    yield {"file": path, "row": row_number, "data": row}
        except Exception as error:  # a parse error deep inside pyarrow, which names the row
            raise parse_error(path, error) from None


class FileStream:
    """Micro-batches of one rank's rows, in order, with the dataset's own resume state."""

    def __init__(self, files: List[str], sequence_column: str, label_column: str, task: Task, spec: TaskSpec,
                 rank: int, world_size: int, micro_batch: int):
        dataset = IterableDataset.from_generator(_file_rows, gen_kwargs={"files": files})
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.columns = (sequence_column, label_column)
        self.task, self.spec, self.micro_batch = task, spec, micro_batch
        self._rows: Optional[Iterator[dict]] = None

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._rows = None

    def next_micro_batch(self) -> Optional[Batch]:
        """b rows as a batch; None when fewer than b remain (they are dropped)."""
        if self._rows is None:
            self._rows = iter(self.dataset)
        samples = []
        for row in self._rows:
            samples.append(row_to_sample(row, *self.columns, self.task, self.spec))
            if len(samples) == self.micro_batch:
                break
        if len(samples) < self.micro_batch:
            return None
        xs, lengths, ys = zip(*samples)
        y_type = torch.int64 if self.task.head == "classes" else torch.float32
        y = torch.stack(ys) if self.task.head == "per-step" else torch.tensor(ys, dtype=y_type)  # (b, T) or (b,)
        batch = {"x": torch.stack(xs), "y": y}  # x (b, T, F), or (b, T) token ids
        batch["index"] = torch.zeros(len(samples), dtype=torch.int64)  # streamed rows carry no stream position
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
        agreed = int(max_over_ranks(self.accelerator, torch.tensor(status)))
        if agreed == self.FAILED:
            raise error or DataFileError("another process could not read its data files (its message names the row)")
        return step if agreed == self.CONTINUE else None
