"""The stream: seekable synthetic samples, sharded exactly across ranks and DataLoader workers.

Invariants (docs/design.md, proven in tests/test_stream.py and tests/test_multiprocess.py):

1. Sample ``i`` is a pure function of (task, seq_len, seed, block_size, split, i). Block ``k`` holds
   samples ``[k*K, (k+1)*K)`` drawn at once by a ``torch.Generator`` seeded from (seed, split, k), so
   any index is reachable in O(1) and generation is vectorised.
2. The global batch of optimizer step ``s`` is stream positions ``[s*G, (s+1)*G)``. Rank ``r`` holds
   the contiguous slice ``[s*G + r*A*b, s*G + (r+1)*A*b)`` of it, cut into ``A`` micro-batches of ``b``.
3. One ``datasets`` example = whole steps of one rank (several micro-batches when ``b`` is small),
   with the stream positions it holds. The shards given to ``datasets`` are ``world_size x slots``
   small descriptors; shard ``w*W + r`` is worker slot ``w`` of rank ``r`` and holds that rank's
   examples ``w, w + slots, ...``. ``split_dataset_by_node`` gives rank ``r`` shards ``r, r+W, ...``
   (slots 0, 1, ...) and DataLoader worker ``w`` gets slot ``w``; the DataLoader's round-robin over
   workers then restores the rank's exact example order for any worker count.
4. Each rank generates only its own samples; the DataLoader is never passed to accelerate.
6. The stream's state is one integer, the first step: shards are rebuilt from it in O(1).

A finite ``dataset_size`` N cycles over the first N samples of the infinite stream, reshuffled every
epoch by a permutation of blocks and of samples within each block (cheap, seekable, and keeps each
micro-batch inside a few blocks). A global batch may straddle two epochs; nothing is dropped.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node

from distseq.errors import TaskContractError, describe
from distseq.ops.signals import ignore_in_worker
from distseq.registry import TASKS
from distseq.tasks import Batch, TaskSpec

MASK64 = (1 << 64) - 1
SPLIT_KEYS = {"train": 0x7472, "eval": 0x6576}  # held-out data uses its own key: it never overlaps training
PERMUTATION_KEY = 0x7065


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def derive_seed(*words: int) -> int:
    """A well-mixed 64-bit seed from a tuple of integers (seed, split, block, ...)."""
    h = 0
    for w in words:
        h = _splitmix64(h ^ (w & MASK64))
    return h


def _generator(*words: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*words))


class LRU:
    """A tiny per-instance cache (functools.lru_cache would pin the instance and share across them)."""

    def __init__(self, size: int, make: Callable):
        self.size, self.make, self.items = size, make, OrderedDict()

    def __call__(self, *key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = self.make(*key)
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


class SampleSource:
    """Random access to the samples of one (task, spec, seed, block_size, split, dataset_size)."""

    def __init__(
        self,
        task: str,
        spec: TaskSpec,
        seed: int,
        block_size: int,
        split: str = "train",
        dataset_size: Optional[int] = None,
        cached_blocks: int = 8,
    ):
        self.task = TASKS[task]
        self.spec, self.seed, self.block_size = spec, seed, block_size
        self.split_key = SPLIT_KEYS[split]
        self._block_generator = torch.Generator()  # reseeded per block: cheaper than a new one
        self.dataset_size = dataset_size
        self._block = LRU(cached_blocks, self._make_block)
        self._epoch_order = LRU(2, self._make_epoch_order)
        self._within_block = LRU(cached_blocks, self._make_within_block)

    def sample_bytes(self) -> int:
        """Bytes of one sample as the stream carries it: x, y, its index (and length)."""
        T = self.spec.seq_len
        y = 8 * T if self.task.head == "per-step" else 8
        return T * self.task.input_bytes(self.spec) + y + 8 + (8 if self.spec.variable else 0)

    # --- generation -------------------------------------------------------------------------
    def _make_block(self, k: int) -> Batch:
        generator = self._block_generator.manual_seed(derive_seed(self.seed, self.split_key, k))
        try:
            return self.task.make(generator, self.block_size, self.spec)
        except Exception as error:  # the task's own code: one line naming it, not a traceback from the loop
            name = self.task.name
            raise TaskContractError(f"task {name!r}: make(generator, {self.block_size}, spec) raised "
                                    f"{describe(error)} (block {k}; distseq check-task --task {name} checks its "
                                    f"whole contract)") from error

    def block(self, k: int) -> Batch:
        """Block ``k`` as the task made it (cached; read-only)."""
        return self._block(k)

    def span(self, start: int, stop: int) -> Batch:
        """The samples at contiguous positions ``[start, stop)`` of an infinite stream, sliced from whole
        blocks without a gather. Read-only: a slice may share memory with a cached block."""
        k = self.block_size
        first, last = start // k, (stop - 1) // k
        parts = [self._block(b) for b in range(first, last + 1)]
        lo, hi = start - first * k, stop - last * k  # within the first block; within the last one
        if len(parts) == 1:
            out = {key: value[lo:hi] for key, value in parts[0].items()}
        else:  # copy only the wanted rows: the first block from lo, the whole middle ones, the last up to hi
            out = {key: torch.cat([parts[0][key][lo:], *(p[key] for p in parts[1:-1]), parts[-1][key][:hi]])
                   for key in parts[0]}
        out["index"] = torch.arange(start, stop, dtype=torch.int64)
        return out

    def runs(self, runs: List[Tuple[int, int]]) -> Batch:
        """The samples of several ``[start, stop)`` runs of positions, concatenated in order."""
        if self.dataset_size is not None:
            return self.samples(torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in runs]))
        spans = [self.span(a, b) for a, b in runs]
        return spans[0] if len(spans) == 1 else {key: torch.cat([s[key] for s in spans]) for key in spans[0]}

    def samples(self, positions: torch.Tensor) -> Batch:
        """The samples at stream ``positions`` (int64, any order), plus ``index`` = the positions."""
        ids = self.data_ids(positions)  # (n,)
        blocks, inverse = torch.unique(ids // self.block_size, return_inverse=True)
        parts = [self._block(int(k)) for k in blocks]
        rows = inverse * self.block_size + ids % self.block_size  # row in the concatenated blocks
        out = {key: torch.cat([p[key] for p in parts])[rows] if len(parts) > 1 else parts[0][key][rows]
               for key in parts[0]}
        out["index"] = positions
        return out

    # --- finite datasets: a seekable per-epoch shuffle ----------------------------------------
    def data_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Map stream positions to sample ids; the identity for an infinite stream."""
        n = self.dataset_size
        if n is None:
            return positions
        epochs, offsets = positions // n, positions % n
        ids = torch.empty_like(positions)
        for epoch in torch.unique(epochs).tolist():
            mask = epochs == epoch
            ids[mask] = self._shuffle(epoch, offsets[mask])
        return ids

    def _block_len(self, k: int) -> int:
        return min(self.block_size, self.dataset_size - k * self.block_size)

    def _make_epoch_order(self, epoch: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's block order and where each shuffled block starts and ends in the epoch."""
        num_blocks = math.ceil(self.dataset_size / self.block_size)
        order = torch.randperm(num_blocks, generator=_generator(self.seed, PERMUTATION_KEY, epoch))
        lengths = torch.full((num_blocks,), self.block_size, dtype=torch.int64)
        lengths[-1] = self._block_len(num_blocks - 1)
        ends = torch.cumsum(lengths[order], 0)  # (num_blocks,)
        return order, ends - lengths[order], ends

    def _make_within_block(self, epoch: int, k: int) -> torch.Tensor:
        return torch.randperm(self._block_len(k), generator=_generator(self.seed, PERMUTATION_KEY, epoch, k + 1))

    def _shuffle(self, epoch: int, offsets: torch.Tensor) -> torch.Tensor:
        order, starts, ends = self._epoch_order(epoch)
        slot = torch.searchsorted(ends, offsets, right=True)  # which shuffled block holds each offset
        block, within = order[slot], offsets - starts[slot]
        ids = torch.empty_like(offsets)
        for k in torch.unique(block).tolist():
            mask = block == k
            ids[mask] = k * self.block_size + self._within_block(epoch, k)[within[mask]]
        return ids


@dataclass(frozen=True)
class Layout:
    """Which stream positions each rank consumes; the global batch G = micro_batch x world x accum."""

    micro_batch: int
    world_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def rank_batch(self) -> int:
        """Samples one rank consumes per optimizer step."""
        return self.micro_batch * self.grad_accum

    def rank_runs(self, rank: int, first_step: int, num_steps: int) -> List[Tuple[int, int]]:
        """Rank ``rank``'s positions for ``num_steps`` steps as ``[start, stop)`` runs, adjacent ones merged."""
        g, r = self.global_batch, self.rank_batch
        if g == r:  # one rank: consecutive steps are adjacent
            return [(first_step * g, (first_step + num_steps) * g)]
        return [(s * g + rank * r, s * g + (rank + 1) * r) for s in range(first_step, first_step + num_steps)]


@dataclass(frozen=True)
class Shard:
    """One lazy piece of the stream: rank ``rank``'s examples ``slot, slot + slots, ...``."""

    rank: int
    slot: int
    slots: int
    first_step: int
    num_steps: int
    steps_per_example: int


def make_shards(layout: Layout, first_step: int, num_steps: int, steps_per_example: int, slots: int) -> List[dict]:
    """``world_size x slots`` descriptors, ordered so shard ``w*W + r`` is slot ``w`` of rank ``r``."""
    return [
        vars(Shard(r, w, slots, first_step, num_steps, steps_per_example))
        for w in range(slots)
        for r in range(layout.world_size)
    ]


def _generate_examples(shards: List[dict], source: SampleSource, layout: Layout) -> Iterator[Batch]:
    for shard in map(lambda d: Shard(**d), shards):
        num_examples = math.ceil(shard.num_steps / shard.steps_per_example)
        end = shard.first_step + shard.num_steps
        for e in range(shard.slot, num_examples, shard.slots):
            first = shard.first_step + e * shard.steps_per_example
            yield source.runs(layout.rank_runs(shard.rank, first, min(shard.steps_per_example, end - first)))


EXAMPLE_BYTES = 2**24  # an example holds at most about this much, whatever --samples-per-example says


def steps_per_example(layout: Layout, samples_per_example: int, sample_bytes: int = 0) -> int:
    """Group whole steps of a rank into one example until it holds at least ``samples_per_example``,
    but not past EXAMPLE_BYTES (at least one step): 16,384 token sequences of 2,048 steps would be
    512 MB to concatenate per example, where the grouping is meant to amortise a ~0.1 ms cost."""
    steps = max(1, math.ceil(samples_per_example / layout.rank_batch))
    if sample_bytes:
        steps = min(steps, max(1, EXAMPLE_BYTES // (sample_bytes * layout.rank_batch)))
    return steps


def train_loader(
    source: SampleSource,
    layout: Layout,
    rank: int,
    first_step: int,
    num_steps: int,
    samples_per_example: int,
    num_workers: int,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over rank ``rank``'s examples for steps ``[first_step, first_step + num_steps)``."""
    grouping = steps_per_example(layout, samples_per_example, source.sample_bytes())
    shards = make_shards(layout, first_step, num_steps, grouping, max(1, num_workers))
    dataset = IterableDataset.from_generator(
        _generate_examples, gen_kwargs={"shards": shards, "source": source, "layout": layout}
    )
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=layout.world_size)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       worker_init_fn=ignore_in_worker if num_workers else None)


def micro_batches(loader, micro_batch: int) -> Iterator[Batch]:
    """Split each example (whole steps of one rank) into micro-batches, in order."""
    for example in loader:
        keys = list(example)
        for parts in zip(*(torch.split(value, micro_batch) for value in example.values())):
            yield dict(zip(keys, parts))


def eval_batches(source: SampleSource, rank: int, world_size: int, eval_size: int, batch_size: int) -> List[Batch]:
    """Rank ``rank``'s contiguous share of held-out positions ``[0, eval_size)``.

    Every rank gets the same number of equally sized batches (DDP collectives stay in lockstep);
    padding rows carry ``index = -1`` and are dropped after gathering.
    """
    per_rank = math.ceil(eval_size / world_size)
    positions = torch.arange(rank * per_rank, (rank + 1) * per_rank, dtype=torch.int64)  # (per_rank,)
    valid = positions < eval_size
    batch = source.samples(torch.where(valid, positions, 0))
    batch["index"] = torch.where(valid, positions, -1)
    return [{k: v[s : s + batch_size] for k, v in batch.items()} for s in range(0, per_rank, batch_size)]


class SyntheticFeed:
    """The synthetic stream: always a full step, for exactly the configured steps (invariant 5)."""

    def __init__(self, batches: Iterator[Batch], grad_accum: int):
        self.batches, self.grad_accum = batches, grad_accum

    def next_step(self) -> Optional[List[Batch]]:
        return [next(self.batches) for _ in range(self.grad_accum)]

    def state_dict(self) -> None:
        return None  # the stream's state is the step itself
