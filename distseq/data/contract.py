"""``distseq check-task``: prove that a task keeps the stream contract (docs/design.md, "The stream").

A task is a function ``make(generator, n, spec)``; the stream makes sample ``i`` a pure function of
(task, spec, seed, block size K, split, i) by seeding one generator per block. Whether a task keeps
that promise is only visible from outside, so ``check_task`` draws samples through ``SampleSource``
and the DataLoader exactly as training does, at a handful of positions (near 0, across block
boundaries, at 10**12 + something and at the last valid position 2**62 - 1), and checks:

- ``shapes``: what ``make`` returns, as the task's head declares it (keys, dtypes, shapes, value
  ranges, lengths and zero padding, finite values, exactly ``n`` samples);
- ``determinism``: two fresh sources give bit-identical samples;
- ``cross-process determinism``: a fresh interpreter (OMP_NUM_THREADS=1, its own hash seed, the same
  plugins) gives the same per-sample sha256 digests;
- ``seek``: a block at 10**12 comes about as fast as block 0, and ``span`` and shuffled ``samples``
  agree there;
- ``world-size invariance``: every global batch is the same on 1, 2 and 3 ranks (and 2 ranks x 2
  accumulation steps), through ``train_loader`` and ``micro_batches``, infinite and finite data;
- ``labels``: ``label(x, lengths, spec)`` recomputes ``y`` (when the task has ``label``);
- ``distinct blocks``: other blocks, the held-out split and another seed give other samples (a task
  that seeds a generator of its own repeats one block forever).

Each property is one ``Finding``; a failure's ``detail`` is one line naming the sample index. A task
that raises or returns garbage gives a failing finding, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from distseq.data.stream import SPLIT_KEYS, Layout, SampleSource, derive_seed, micro_batches, train_loader
from distseq.errors import TaskContractError, describe
from distseq.registry import PLUGINS, TASKS, import_plugins
from distseq.tasks import IGNORE, TaskSpec

FAR = 10**12 + 12_345  # "far": a position no test of a naive (skipping) stream could reach
LAST = 2**62  # stream positions are below this (config.MAX_POSITION)
GLOBAL_BATCH = 12  # divisible by every world size checked
LAYOUTS = ((1, 1), (2, 1), (3, 1), (2, 2))  # (world size, grad accumulation); (1, 1) is the reference
STEPS = 3  # optimizer steps per world-size case; examples of 2 steps, so one example is partial
FINITE_SIZE = 100  # --dataset-size for the finite case unless the configuration sets one
SEEK_RATIO, SEEK_FLOOR_S = 20.0, 0.5  # a far block may be this much slower, and by at least this
LABEL_RTOL, LABEL_ATOL = 1e-5, 1e-6  # float labels: recomputation may round differently
CHILD_TIMEOUT_S = 180.0
CHILD_MARK = "distseq-check-task-result "
PROPERTIES = ("shapes", "determinism", "cross-process determinism", "seek", "world-size invariance",
              "labels", "distinct blocks")


@dataclass(frozen=True)
class Finding:
    name: str  # the property
    ok: bool
    detail: str  # one line; a failure names what differed and at which sample index


class _TaskFailure(Exception):
    """The task's own code failed or returned something unusable; the message is the finding's detail."""


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- what make() returns --------------------------------------------------------------------------
def _expected_keys(spec: TaskSpec) -> Tuple[str, ...]:
    return ("x", "y", "lengths") if spec.variable else ("x", "y")


def _structure_problem(out, n: int, spec: TaskSpec) -> Optional[str]:
    """Enough of the contract for the stream to slice and concatenate blocks; None when it holds."""
    if not isinstance(out, Mapping):
        return f"make() returned a {type(out).__name__}, not a dict of tensors"
    keys, expected = set(out), set(_expected_keys(spec))
    if keys != expected:
        parts = []
        if expected - keys:
            parts.append("lacks " + ", ".join(sorted(expected - keys)))
        if keys - expected:
            parts.append("has unexpected " + ", ".join(sorted(map(str, keys - expected))))
        why = ("; lengths vary (min_seq_len < seq_len)" if spec.variable else
               "; every sample has seq_len steps, so no lengths") if "lengths" in keys ^ expected else ""
        return f"make() returned keys {sorted(map(str, keys))}: {' and '.join(parts)}{why}"
    for key in _expected_keys(spec):
        value = out[key]
        if not isinstance(value, torch.Tensor):
            return f"make() returned {key} as a {type(value).__name__}, not a torch.Tensor"
        if value.dim() == 0 or value.shape[0] != n:
            return f"make(generator, {n}, spec) returned {key} of shape {tuple(value.shape)}: not {n} samples"
    return None


def _first(mask: torch.Tensor) -> Optional[int]:
    """The first True row of a (n,) or (n, ...) mask."""
    rows = mask.reshape(mask.shape[0], -1).any(1) if mask.dim() > 1 else mask
    hits = rows.nonzero()
    return int(hits[0]) if len(hits) else None


def batch_problem(out, n: int, spec: TaskSpec, task, first_index: int) -> Optional[str]:
    """Everything the head declares about one make() result; ``first_index`` = the stream position of row 0."""
    problem = _structure_problem(out, n, spec)
    if problem:
        return problem
    T, F, C = spec.seq_len, task.num_features(spec), task.num_outputs(spec)
    x, y, lengths = out["x"], out["y"], out.get("lengths")
    for key in _expected_keys(spec):
        if out[key].device.type != "cpu":
            return f"{key} is on {out[key].device}; the stream draws on the CPU"
    if task.tokens:
        V = task.vocab(spec)
        if x.dtype != torch.int64 or tuple(x.shape) != (n, T):
            return f"x is {tuple(x.shape)} {_dtype(x)}; a token task needs ({n}, {T}) int64 (n, seq_len) token ids"
    elif x.dtype != torch.float32 or tuple(x.shape) != (n, T, F):
        return f"x is {tuple(x.shape)} {_dtype(x)}; expected ({n}, {T}, {F}) float32 (n, seq_len, num_features)"
    y_shape, y_dtype = ((n, T), torch.int64) if task.head == "per-step" else \
        ((n,), torch.int64) if task.head == "classes" else ((n,), torch.float32)
    if y.dtype != y_dtype or tuple(y.shape) != y_shape:
        return (f"y is {tuple(y.shape)} {_dtype(y)}; head {task.head!r} needs {y_shape} "
                f"{str(y_dtype).replace('torch.', '')}")
    checks = [((x < 0) | (x >= V), f"x holds a token id outside [0, {V}) (vocab)")] if task.tokens else \
        [(~torch.isfinite(x), "x is not finite")]
    if task.head in ("binary", "regression"):
        checks.append((~torch.isfinite(y), "y is not finite"))
    if task.head == "binary":
        checks.append(((y < 0) | (y > 1), "y is outside [0, 1] (a binary target)"))
    if task.head == "classes":
        checks.append(((y < 0) | (y >= C), f"y is outside [0, {C}) (num_outputs classes)"))
    if task.head == "per-step":
        checks.append((((y < 0) | (y >= C)) & (y != IGNORE), f"y is outside [0, {C}) and not IGNORE ({IGNORE})"))
    if lengths is not None:
        if lengths.dtype != torch.int64 or tuple(lengths.shape) != (n,):
            return f"lengths is {tuple(lengths.shape)} {_dtype(lengths)}; expected ({n},) int64"
        checks.append(((lengths < spec.min_seq_len) | (lengths > T),
                       f"lengths is outside [min_seq_len, seq_len] = [{spec.min_seq_len}, {T}]"))
        pad = torch.arange(T)[None, :] >= lengths[:, None]  # (n, T): steps at or beyond the length
        checks.append(((x != 0) & (pad if task.tokens else pad[..., None]), "x is not zero at a step at or beyond its "
                                                                              "length"))
    for mask, what in checks:
        row = _first(mask)
        if row is not None:
            value = _row_values(out, row)
            return f"sample {first_index + row}: {what} ({value})"
    return None


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _row_values(batch, row: int) -> str:
    parts = []
    for key in ("y", "lengths"):
        if key in batch:
            value = batch[key][row]
            parts.append(f"{key}={value.tolist() if value.numel() <= 8 else '...'}")
    return ", ".join(parts)


def _global_rng_states() -> Dict[str, object]:
    """The process-wide random states a task must leave alone (it draws from the generator it is given)."""
    states = {"torch's global RNG": torch.random.get_rng_state(), "Python's global RNG (random)": random.getstate()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy's global RNG"] = numpy.random.get_state()
    return states


def _changed(before: Dict[str, object], after: Dict[str, object]) -> List[str]:
    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, tuple):  # numpy's state holds an array
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return bool(getattr(a == b, "all", lambda: a == b)())

    return [name for name in before if not same(before[name], after[name])]


class _Source(SampleSource):
    """A SampleSource whose task failures become one-line ``_TaskFailure``s naming the block, and which
    notes the first block whose make() touched a global random state (``global_rng``: (block, names))."""

    global_rng: Optional[Tuple[int, List[str]]] = None

    def _make_block(self, k: int):
        K = self.block_size
        where = f"block {k} (samples {k * K}..{(k + 1) * K - 1})"
        before = _global_rng_states()
        try:
            out = super()._make_block(k)
        except TaskContractError as error:  # the stream's own line; here, what make raised and where
            raise _TaskFailure(f"make(generator, {K}, spec) raised {describe(error.__cause__)} "
                               f"drawing {where}") from None
        changed = _changed(before, _global_rng_states())
        if changed and self.global_rng is None:
            self.global_rng = (k, changed)
        problem = _structure_problem(out, K, self.spec)
        if problem:
            raise _TaskFailure(f"{where}: {problem}")
        return out


# --- where to look ------------------------------------------------------------------------------------
def probe_runs(block_size: int) -> List[Tuple[int, int]]:
    """The ``[start, stop)`` runs of positions the determinism checks compare, ascending and disjoint:
    the first samples, a block boundary, a later block, 10**12 + something, a boundary past 10**12, and
    the last valid positions."""
    K = block_size
    far_edge = -(-10**12 // K) * K + K  # a block boundary past 10**12
    wanted = [(0, 8), (max(0, K - 2), K + 2), (5 * K + 3, 5 * K + 5), (FAR, FAR + 4),
              (far_edge - 2, far_edge + 2), (LAST - 4, LAST)]
    positions = sorted({p for a, b in wanted for p in range(a, b)})
    runs: List[List[int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [(a, b) for a, b in runs]


def _positions(runs: Sequence[Tuple[int, int]]) -> List[int]:
    return [p for a, b in runs for p in range(a, b)]


# --- comparing samples --------------------------------------------------------------------------------
def _rows_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) True where rows of ``a`` and ``b`` are not bit-identical (NaN equals the same NaN)."""
    n = a.shape[0]
    if a.shape != b.shape or a.dtype != b.dtype:
        return torch.ones(n, dtype=torch.bool)
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    a8 = a.contiguous().view(torch.uint8).reshape(n, -1)
    b8 = b.contiguous().view(torch.uint8).reshape(n, -1)
    return (a8 != b8).any(1)


def _first_difference(a, b, keys: Iterable[str]) -> Optional[Tuple[int, List[str]]]:
    """(row, keys that differ there) for the first row where any of ``keys`` differs; None if none."""
    diffs = {key: _rows_differ(a[key], b[key]) for key in keys}
    if not diffs:
        return None
    row = _first(torch.stack(list(diffs.values())).any(0))
    if row is None:
        return None
    return row, [key for key, d in diffs.items() if bool(d[row])]


def _data_keys(batch) -> List[str]:
    return [key for key in ("x", "y", "lengths") if key in batch]


def _differ_text(keys: List[str]) -> str:
    return (" and ".join(keys) + (" differ" if len(keys) > 1 else " differs")) if keys else "differs"


def sample_digests(batch) -> List[Dict[str, str]]:
    """Per sample, a short sha256 of each of x, y, lengths (dtype and shape included)."""
    keys = _data_keys(batch)
    n = batch["x"].shape[0]
    out: List[Dict[str, str]] = [{} for _ in range(n)]
    for key in keys:
        t = batch[key].contiguous()
        head = f"{t.dtype}{tuple(t.shape[1:])}".encode()
        rows = t.view(torch.uint8).reshape(n, -1).numpy() if n else []
        for i in range(n):
            out[i][key] = hashlib.sha256(head + rows[i].tobytes()).hexdigest()[:20]
    return out


# --- the properties ----------------------------------------------------------------------------------
@dataclass
class _Context:
    name: str
    task: object
    spec: TaskSpec
    seed: int
    block_size: int
    dataset_size: int

    def source(self, split: str = "train", seed: Optional[int] = None, dataset_size: Optional[int] = None) -> _Source:
        return _Source(self.name, self.spec, self.seed if seed is None else seed, self.block_size, split, dataset_size)


def _shapes(ctx: _Context) -> Finding:
    K, task, spec = ctx.block_size, ctx.task, ctx.spec
    small = 5 if K != 5 else 7
    far_block = FAR // K
    cases = [(0, K, 0), (far_block, K, far_block * K), (0, small, 0)]  # (block seed, n, position of row 0)
    for block, n, first_index in cases:
        generator = torch.Generator().manual_seed(derive_seed(ctx.seed, SPLIT_KEYS["train"], block))
        try:
            out = task.make(generator, n, spec)
        except Exception as error:
            return Finding("shapes", False, f"make(generator, {n}, spec) raised {describe(error)}"
                           + (f" (block {block})" if block else ""))
        problem = batch_problem(out, n, spec, task, first_index)
        if problem:
            where = "" if problem.startswith("sample ") else f"block {block}, make(generator, {n}, spec): "
            return Finding("shapes", False, where + problem)
    y = out["y"]
    lengths = f"lengths int64 in [{spec.min_seq_len}, {spec.seq_len}], zero-padded" if spec.variable else "no lengths"
    x_kind = f"x ({K}, {spec.seq_len}) int64 ids in [0, {task.vocab(spec)})" if task.tokens else \
        f"x ({K}, {spec.seq_len}, {task.num_features(spec)}) float32"
    return Finding("shapes", True, f"{x_kind}, y "
                   f"{('(%d,)' % K) if y.dim() == 1 else '(%d, %d)' % (K, spec.seq_len)} {_dtype(y)} as head "
                   f"{task.head!r} declares, {lengths}, {'in range' if task.tokens else 'finite'}; "
                   f"make(generator, {small}, spec) gives {small} samples")


def _determinism(ctx: _Context, runs) -> Finding:
    first, second = ctx.source(), ctx.source()
    a, b = first.runs(runs), second.runs(runs)
    rng = first.global_rng or second.global_rng
    uses = " and ".join(rng[1]) if rng else ""
    difference = _first_difference(a, b, _data_keys(a))
    if difference:
        row, keys = difference
        why = (f"make() draws from {uses} instead of the generator it is given" if rng else
               "make() must depend on nothing but the generator it is given")
        return Finding("determinism", False, f"sample {int(a['index'][row])}: {_differ_text(keys)} between two calls "
                       f"(two fresh sources): {why}")
    if rng:
        k = rng[0]
        return Finding("determinism", False,
                       f"sample {k * ctx.block_size}: drawing block {k}, make() changed the state "
                       f"of {uses}, which training's initialisation and dropout share: draw only from the "
                       "generator it is given")
    return Finding("determinism", True, f"{len(a['index'])} samples at positions 0 to 2**62-1 bit-identical "
                   "from two fresh sources; no global RNG touched")


def _seek(ctx: _Context) -> Finding:
    K = ctx.block_size
    m = min(8, K)
    far = (FAR // K + 1) * K  # the start of a block past 10**12

    def timed(start: int) -> float:
        source = ctx.source()
        began = time.perf_counter()
        source.span(start, start + m)
        return time.perf_counter() - began

    timed(0)  # warm-up: first allocations
    near_s, far_s = math.inf, math.inf
    for _ in range(3):
        near_s, far_s = min(near_s, timed(0)), min(far_s, timed(far))
    if far_s > SEEK_RATIO * near_s and far_s > SEEK_FLOOR_S:
        return Finding("seek", False, f"sample {far}: its block took {far_s * 1e3:.1f} ms against {near_s * 1e3:.1f} "
                       f"ms for sample 0 ({far_s / near_s:.0f}x): not O(1)")
    # Two routes to the same far samples: contiguous spans, and a gather at shuffled positions.
    edge = far + K  # a block boundary
    runs = [(edge - m, edge + m), (LAST - m, LAST)]
    spans = [ctx.source().span(a, b) for a, b in runs]
    direct = {key: torch.cat([s[key] for s in spans]) for key in spans[0]}
    positions = direct["index"]
    order = torch.randperm(len(positions), generator=torch.Generator().manual_seed(ctx.seed))
    shuffled = ctx.source().samples(positions[order])
    if not torch.equal(shuffled["index"], positions[order]):
        return Finding("seek", False, "samples() returned other positions than it was asked for")
    back = {key: torch.empty_like(value) for key, value in shuffled.items()}
    for key, value in shuffled.items():
        back[key][order] = value
    difference = _first_difference(direct, back, _data_keys(direct))
    if difference:
        row, keys = difference
        return Finding("seek", False, f"sample {int(positions[row])}: {_differ_text(keys)} between span() and "
                       "samples() at shuffled positions")
    return Finding("seek", True, f"block at sample {far}: {far_s * 1e3:.2f} ms, block 0: {near_s * 1e3:.2f} ms; "
                   f"span() and shuffled samples() agree at {len(positions)} far samples")


def _global_batches(source: SampleSource, world: int, accum: int, first_step: int) -> List[dict]:
    """Step by step, every rank's micro-batches concatenated in rank order, as the DataLoader yields them."""
    micro = GLOBAL_BATCH // (world * accum)
    layout = Layout(micro, world, accum)
    per_rank = []
    for rank in range(world):
        loader = train_loader(source, layout, rank, first_step, STEPS, 2 * layout.rank_batch, num_workers=0)
        batches = list(micro_batches(loader, micro))
        if len(batches) != STEPS * accum:
            raise _TaskFailure(f"rank {rank} of {world} got {len(batches)} micro-batches for {STEPS} steps, "
                               f"expected {STEPS * accum}")
        per_rank.append(batches)
    steps = []
    for k in range(STEPS):
        parts = [b for rank in range(world) for b in per_rank[rank][k * accum : (k + 1) * accum]]
        steps.append({key: torch.cat([p[key] for p in parts]) for key in parts[0]})
    return steps


def _world_size(ctx: _Context) -> Finding:
    K, G = ctx.block_size, GLOBAL_BATCH
    cases = [
        ("infinite stream", None, max(1, K // G)),  # steps across the boundary of blocks 0 and 1
        ("infinite stream", None, FAR // G),
        (f"dataset_size={ctx.dataset_size}", ctx.dataset_size, max(1, ctx.dataset_size // G - 1)),  # across an epoch
    ]
    for label, size, first_step in cases:
        source, direct_source = ctx.source(dataset_size=size), ctx.source(dataset_size=size)
        reference = _global_batches(source, 1, 1, first_step)
        for k, batch in enumerate(reference):
            expected = torch.arange((first_step + k) * G, (first_step + k + 1) * G)
            if not torch.equal(batch["index"], expected):
                return Finding("world-size invariance", False, f"{label}, step {first_step + k}: 1 rank reads "
                               f"positions {batch['index'][:4].tolist()}..., not {expected[:4].tolist()}...")
            direct = direct_source.samples(expected)
            difference = _first_difference(batch, direct, _data_keys(direct))
            if difference:
                row, keys = difference
                return Finding("world-size invariance", False, f"sample {int(expected[row])}: {_differ_text(keys)} "
                               f"between the DataLoader and SampleSource.samples ({label}, step {first_step + k})")
        for world, accum in LAYOUTS[1:]:
            ranks = f"{world} ranks" + (f" x {accum} accumulation steps" if accum > 1 else "")
            for k, (one, many) in enumerate(zip(reference, _global_batches(source, world, accum, first_step))):
                step = first_step + k
                if not torch.equal(one["index"], many["index"]):
                    row = _first(one["index"] != many["index"]) if one["index"].shape == many["index"].shape else 0
                    return Finding("world-size invariance", False, f"sample {int(one['index'][row])}: {ranks} put "
                                   f"position {int(many['index'][row])} there ({label}, step {step})")
                difference = _first_difference(one, many, _data_keys(one))
                if difference:
                    row, keys = difference
                    return Finding("world-size invariance", False, f"sample {int(one['index'][row])}: "
                                   f"{_differ_text(keys)} between 1 rank and {ranks} ({label}, step {step})")
    return Finding("world-size invariance", True, f"global batch {G} identical on 1, 2, 3 ranks and 2 ranks x 2 "
                   f"accumulation steps, {STEPS} steps from step {max(1, K // G)} and from sample ~10**12, and with "
                   f"dataset_size={ctx.dataset_size} across an epoch")


def _labels(ctx: _Context, runs) -> Finding:
    label = getattr(ctx.task, "label", None)
    if label is None:
        return Finding("labels", True, "not checked: the task has no label()")
    source = ctx.source()
    checked = 0
    head = max(ctx.block_size, 256)  # all of block 0, or the first blocks when they are small
    for a, b in [(0, head)] + [r for r in runs if r[0] >= head]:
        batch = source.span(a, b)
        x, y, lengths = batch["x"], batch["y"], batch.get("lengths")
        try:
            again = label(x.clone(), None if lengths is None else lengths.clone(), ctx.spec)
        except Exception as error:
            return Finding("labels", False,
                           f"label(x, lengths, spec) raised {describe(error)} on samples {a}..{b - 1}")
        if not isinstance(again, torch.Tensor) or tuple(again.shape) != tuple(y.shape):
            shape = tuple(again.shape) if isinstance(again, torch.Tensor) else type(again).__name__
            return Finding("labels", False, f"label() returned {shape} for samples {a}..{b - 1}; y is {tuple(y.shape)}")
        if y.is_floating_point() or again.is_floating_point():
            same = torch.isclose(again.double(), y.double(), rtol=LABEL_RTOL, atol=LABEL_ATOL)
        else:
            same = again.to(torch.int64) == y.to(torch.int64)
        row = _first(~same)
        if row is not None:
            if same.dim() == 1:
                where, got, want = f"sample {a + row}", again[row], y[row]
            else:  # per-step labels: name the step too
                step = int((~same[row]).reshape(-1).nonzero()[0])
                where, got, want = (f"sample {a + row}, step {step}", again[row].reshape(-1)[step],
                                    y[row].reshape(-1)[step])
            return Finding("labels", False, f"{where}: label() gives {got.item()} but make() gave y = {want.item()}")
        checked += b - a
    return Finding("labels", True, f"label(x, lengths, spec) equals y on {checked} samples"
                   + (f" (floats within rtol {LABEL_RTOL:g})" if ctx.task.head == "regression" else ""))


def _distinct_blocks(ctx: _Context) -> Finding:
    """A task that ignores the generator's seed (its own generator, torch.manual_seed inside make) is
    deterministic but repeats one block forever, and its held-out split is its training data."""
    K = ctx.block_size
    count = min(64, max(2, math.ceil(256 / K)))  # enough samples that a genuine task cannot repeat by chance
    blocks = list(range(count)) + [FAR // K]
    train, held_out, reseeded = ctx.source(), ctx.source("eval"), ctx.source(seed=(ctx.seed + 1) % 2**63)

    def block(source, k):
        return source.span(k * K, (k + 1) * K)

    first = block(train, 0)
    keys = _data_keys(first)
    if all(_first_difference(first, block(train, k), keys) is None for k in blocks[1:]):
        alike = all(bool((first[key] == first[key][:1]).all()) for key in keys)
        why = ("every sample is the same: at these options the task has one possible sample" if alike else
               "make() ignores the generator's seed")
        return Finding("distinct blocks", False, f"sample {blocks[1] * K}: block {blocks[1]} repeats block 0 exactly "
                       f"(as do all {len(blocks)} blocks checked): {why}")
    if all(_first_difference(block(train, k), block(held_out, k), keys) is None for k in blocks):
        return Finding("distinct blocks", False, "sample 0: the held-out split repeats the training samples exactly "
                       f"({len(blocks)} blocks checked): make() ignores the generator's seed")
    if all(_first_difference(block(train, k), block(reseeded, k), keys) is None for k in blocks):
        return Finding("distinct blocks", False, "sample 0: --seed does not change the samples "
                       f"({len(blocks)} blocks checked): make() ignores the generator's seed")
    return Finding("distinct blocks", True, f"{len(blocks)} blocks, the held-out split and another seed all give "
                   "different samples")


# --- the fresh process ---------------------------------------------------------------------------------
_CHILD_CODE = """
import json, sys
a = json.loads(sys.stdin.read())
sys.path[:0] = [p for p in a["path"] if p not in sys.path]
from distseq.registry import TASKS, import_plugins

def answer(result):
    sys.stdout.write("\\n" + a["mark"] + json.dumps(result) + "\\n")
    sys.stdout.flush()

try:
    import_plugins(a["plugins"])
except Exception as error:
    answer({"error": "importing the plugins raised %s: %s" % (type(error).__name__, str(error).strip())})
    sys.exit(0)
if not a["builtin"] and not TASKS.registered(a["task"]):  # no plugin registers it: answer before importing torch
    answer({"missing": True})
    sys.exit(0)
from distseq.data.contract import _child_main
answer(_child_main(a))
"""


def _start_child(ctx: _Context, runs, plugins: List[str]) -> subprocess.Popen:
    # A task whose code lives outside distseq exists in a fresh process only if a plugin registers it:
    # the child can then say "missing" before importing torch.
    builtin = str(getattr(ctx.task.make, "__module__", "")).startswith("distseq.")
    payload = {"path": [p for p in sys.path if isinstance(p, str)], "plugins": plugins, "task": ctx.name,
               "builtin": builtin, "mark": CHILD_MARK,
               "spec": ctx.spec.as_dict(), "seed": ctx.seed, "block_size": ctx.block_size,
               "runs": [list(r) for r in runs]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONHASHSEED", None)  # its own hash seed: a task depending on hash() differs
    child = subprocess.Popen([sys.executable, "-c", _CHILD_CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    child.stdin.write(json.dumps(payload).encode())
    child.stdin.close()
    child.stdin = None  # communicate() must not touch it again
    return child


def _child_main(args: dict) -> dict:
    """In the fresh process, plugins imported: the digests of the samples at ``args["runs"]``."""
    if args["task"] not in TASKS:
        return {"missing": True}
    try:
        spec = TaskSpec(**args["spec"])
        batch = _Source(args["task"], spec, args["seed"], args["block_size"]).runs([tuple(r) for r in args["runs"]])
        return {"digests": sample_digests(batch)}
    except Exception as error:
        return {"error": _one_line(str(error) if isinstance(error, _TaskFailure) else describe(error))}


def _cross_process(ctx: _Context, runs, child: subprocess.Popen, plugins: List[str]) -> Finding:
    name = "cross-process determinism"
    try:
        out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return Finding(name, False, f"the fresh process did not answer within {CHILD_TIMEOUT_S:.0f} s")
    lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith(CHILD_MARK)]
    if not lines:
        last = ([line for line in err.decode(errors="replace").splitlines() if line.strip()] or ["no output"])[-1]
        return Finding(name, False, f"the fresh process failed (exit {child.returncode}): {_one_line(last)}")
    result = json.loads(lines[-1][len(CHILD_MARK):])
    if "error" in result:
        return Finding(name, False, f"in a fresh process: {result['error']}")
    if result.get("missing"):
        return Finding(name, True, f"not checked: no plugin registers {ctx.name!r} in a fresh process (it was "
                       f"registered in this one only; put it in a module and --import it)")
    theirs, mine = result["digests"], sample_digests(ctx.source().runs(runs))
    positions = _positions(runs)
    for position, a, b in zip(positions, mine, theirs):
        if a != b:
            keys = [key for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
            return Finding(name, False, f"sample {position}: {_differ_text(keys)} between this process and a fresh one "
                           "(per-sample sha256)")
    if len(theirs) != len(mine):
        return Finding(name, False, f"a fresh process drew {len(theirs)} samples where this one drew {len(mine)}")
    whole = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:12]
    via = f" with {len(plugins)} plugin(s)" if plugins else ""
    return Finding(name, True, f"{len(mine)} samples identical in a fresh process{via} (OMP_NUM_THREADS=1, own "
                   f"hash seed; sha256 {whole})")


# --- entry points ---------------------------------------------------------------------------------------
def _guarded(name: str, check: Callable[[], Finding]) -> Finding:
    try:
        return check()
    except _TaskFailure as failure:
        return Finding(name, False, _one_line(str(failure)))
    except Exception as error:  # the task's code failed somewhere the checks did not foresee
        return Finding(name, False, _one_line(f"raised {describe(error)}"))


def check_task(cfg, imports: Iterable[str] = ()) -> List[Finding]:
    """Check the task ``cfg.data.task`` at ``cfg``'s shape, seed and block size; one Finding per property
    (``PROPERTIES``, in that order). ``cfg`` should be validated; ``imports`` are plugins to import first
    (already imported ones are skipped) and are imported again by the fresh process."""
    import_plugins(list(imports or ()))
    name = cfg.data.task
    ctx = _Context(name, TASKS[name], cfg.task_spec(), cfg.train.seed, cfg.data.block_size,
                   cfg.data.dataset_size or FINITE_SIZE)
    runs = probe_runs(ctx.block_size)
    plugins = list(PLUGINS)
    child = _start_child(ctx, runs, plugins)  # imports torch meanwhile: runs while this process checks
    try:
        findings = [
            _guarded("shapes", lambda: _shapes(ctx)),
            _guarded("determinism", lambda: _determinism(ctx, runs)),
            None,
            _guarded("seek", lambda: _seek(ctx)),
            _guarded("world-size invariance", lambda: _world_size(ctx)),
            _guarded("labels", lambda: _labels(ctx, runs)),
            _guarded("distinct blocks", lambda: _distinct_blocks(ctx)),
        ]
        findings[2] = _guarded("cross-process determinism", lambda: _cross_process(ctx, runs, child, plugins))
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return findings


def format_findings(task_name: str, findings: Sequence[Finding]) -> str:
    """One line per property (``ok`` or ``FAIL``, the property, its detail), then a verdict."""
    width = max((len(f.name) for f in findings), default=0)
    lines = [f"{'ok' if f.ok else 'FAIL':<4}  {f.name:<{width}}  {f.detail}" for f in findings]
    failed = sum(not f.ok for f in findings)
    lines.append(f"task {task_name!r}: " + (f"keeps the stream contract ({len(findings)} properties)" if not failed
                                             else f"{failed} of {len(findings)} properties failed"))
    return "\n".join(lines)
