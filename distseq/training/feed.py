"""This rank's training data, as a stateful component of the run: the synthetic stream, indexed
--data-files, or --data-streaming's one pass.

Its checkpointed state is per rank: a streamed file's position (``data-rank{r}.pt``); the stream and
indexed files need none, their position is the step itself (invariant 6). ``start(step)`` builds the
DataLoader from the step the run starts at, after a resume has restored any state.
"""

from __future__ import annotations

from typing import List, Optional

from accelerate import Accelerator

from distseq.config import TrainConfig
from distseq.data.files import resolve_files
from distseq.data.stream import Layout, SampleSource, SyntheticFeed, micro_batches, train_loader
from distseq.data.streaming import FileFeed, FileStream
from distseq.errors import DistseqError
from distseq.registry import TASKS
from distseq.tasks import Batch
from distseq.training.datasets import Index, train_source


class TrainingFeed:
    """``next_step()``: the step's micro-batches (or None once every rank agreed the files are used up)."""

    def __init__(self, cfg: TrainConfig, *, accelerator: Accelerator, layout: Layout, files: Optional[Index]):
        self.cfg, self.accelerator, self.layout, self.files = cfg, accelerator, layout, files
        self.feed = None
        self.restored: Optional[dict] = None  # a streamed position loaded before start()
        self.examples = None  # the DataLoader's iterator (its workers), synthetic and indexed data

    def state_dict(self) -> Optional[dict]:
        if self.feed is not None:
            return self.feed.state_dict()
        return self.restored

    def load_state_dict(self, state: dict) -> None:
        self.restored = state

    def start(self, step: int) -> None:
        """The DataLoader from ``step`` to --max-steps (or the streamed files from their restored position)."""
        d, t, layout, rank = self.cfg.data, self.cfg.train, self.layout, self.accelerator.process_index
        task, spec = TASKS[d.task], self.cfg.task_spec()
        if d.data_streaming:
            stream = FileStream(resolve_files(d.data_files), d.sequence_column, d.label_column, task, spec, rank,
                                layout.world_size, layout.micro_batch)
            if self.restored is not None:
                stream.load_state_dict(self.restored)
            self.feed = FileFeed(stream, layout.grad_accum, self.accelerator)
            return
        source = (train_source(self.cfg, self.files) if self.files is not None else
                  SampleSource(d.task, spec, t.seed, d.block_size, "train", d.dataset_size))
        loader = train_loader(source, layout, rank, step, t.max_steps - step, d.samples_per_example, d.num_workers,
                              pin_memory=self.accelerator.device.type == "cuda")
        self.examples = iter(loader)
        self.feed = SyntheticFeed(micro_batches(self.examples, layout.micro_batch), layout.grad_accum)

    def source_size(self) -> int:
        """Samples of the files training reads (the held-out share left out)."""
        return train_source(self.cfg, self.files).count

    def next_step(self) -> Optional[List[Batch]]:
        try:
            return self.feed.next_step()
        except DistseqError as error:  # a worker's: shut the workers down, and keep the error's own line
            self.close()
            raise in_one_line(error) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """End the DataLoader's workers now. Left to the exit, a failed run would never end: the workers ignore
        SIGTERM (a stop signal is the main process's), which is how multiprocessing ends them at exit."""
        shutdown = getattr(self.examples, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def in_one_line(error: DistseqError) -> DistseqError:
    """A DistseqError raised in a DataLoader worker comes back as "Caught ... in DataLoader worker process N"
    and the worker's traceback; its own message is the last line."""
    text = str(error)
    if "in DataLoader worker process" not in text.split("\n", 1)[0]:
        return error
    last = text.strip().splitlines()[-1]
    for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
            break
    error.args = (last,)
    return error
