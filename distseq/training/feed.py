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
from distseq.data.index import FileIndex, FileSource
from distseq.data.stream import Layout, SampleSource, SyntheticFeed, micro_batches, train_loader
from distseq.data.streaming import FileFeed, FileStream
from distseq.registry import TASKS
from distseq.tasks import Batch


class TrainingFeed:
    """``next_step()``: the step's micro-batches (or None once every rank agreed the files are used up)."""

    def __init__(self, cfg: TrainConfig, *, accelerator: Accelerator, layout: Layout, files: Optional[FileIndex]):
        self.cfg, self.accelerator, self.layout, self.files = cfg, accelerator, layout, files
        self.feed = None
        self.restored: Optional[dict] = None  # a streamed position loaded before start()

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
        source = (FileSource(self.files, t.seed, spec.variable) if self.files is not None else
                  SampleSource(d.task, spec, t.seed, d.block_size, "train", d.dataset_size))
        loader = train_loader(source, layout, rank, step, t.max_steps - step, d.samples_per_example, d.num_workers,
                              pin_memory=self.accelerator.device.type == "cuda")
        self.feed = SyntheticFeed(micro_batches(loader, layout.micro_batch), layout.grad_accum)

    def next_step(self) -> Optional[List[Batch]]:
        return self.feed.next_step()
