"""``--data-files`` as one indexed dataset: every row addressable in O(1), from memory-mapped Arrow.

**The index.** Each file is read once with pyarrow (parquet in row groups, JSON lines in blocks),
every row validated with vectorised checks, and written as an Arrow file in the cache (the format
``datasets`` keeps its own cache in: ``datasets.Dataset.from_file(path)`` opens one): ``x`` the
sequence as a fixed-size list of ``T*F`` float32 (zero-padded), ``y`` the label (int64 for classes,
else float32), ``length`` (int32). Rows are read back by index with numpy gathers on zero-copy
views of the memory map, in record batches of at most CHUNK_BYTES; no per-row Python anywhere.
An index's own sha256 is recorded when it is built and checked in each process before it serves a
row (``index_intact``: once per process per stat of the file): an index whose bytes were overwritten
is indexed again at start, with one line, and one damaged under a running job stops it at the next
checkpoint, which is not written.

**The cache** (``--data-cache``, else ``$DISTSEQ_CACHE``, else ``$XDG_CACHE_HOME/distseq`` or
``~/.cache/distseq``; entries under ``files/``). A file's entry is named by its absolute path and the
row shape the run asks for (columns, lengths, features, head); its record (``.json``) holds the file's
stat when it was indexed (size, modification time, inode change time, inode: ``filestat``), its row
count, the sha256 of its bytes and that of its index, and who built it. An entry whose file has another
size, or another stat and other bytes, or whose index does not hash as recorded, is rebuilt with one
line of notice. Entries are built under an exclusive ``flock`` of the entry, into a temporary name,
then renamed: every process of a job and every later job reuses one build, and nobody reads half of
one (a process that waited says whose build it uses). A running job
keeps the memory map of the index it opened even when another job replaces it.

**Bad data** is found while indexing, before anything of the run is written: the first bad row of a
file is handed to ``files.row_to_sample``, whose one-line message names the file and the row (the
same messages as ``--data-streaming``). A JSON-lines file that pyarrow cannot parse is read again
line by line to name the first bad row.

**The order** (``FileSource``): the rows of all files, in ``--data-files`` order, are rows
``[0, N)``. Stream position ``p`` is row ``perm_e(p mod N)`` of epoch ``e = p div N``, where
``perm_e`` is a ``sampling.Permutation`` keyed by (seed, epoch): a full shuffle per epoch, evaluated
at any position in O(1). ``FileSource`` has the synthetic ``SampleSource``'s interface, so the
stream's invariants (docs/design.md) hold on files unchanged: the global batch of step ``s`` is
positions ``[sG, (s+1)G)``, a batch may straddle two epochs, and the data state is the step alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from distseq.data.files import check_files, file_format, row_to_sample
from distseq.data.filestat import FileStat, difference
from distseq.data.stream import LRU, derive_seed
from distseq.errors import ConfigError, DataFileError, DistseqError, RunIOError
from distseq.fsio import sha256_file, write_json
from distseq.tasks import IGNORE, Batch, Task, TaskSpec
from distseq.tasks.sampling import Permutation

INDEX_VERSION = 1
CHUNK_BYTES = 64 << 20  # bytes per record batch of an index: bounded memory while building, few chunks to gather from
JSON_BLOCK_BYTES = 16 << 20  # pyarrow parses JSON lines in blocks; a longer row retries with 8x larger ones
MAX_JSON_BLOCK_BYTES = 1 << 30
ORDER_KEY = 0x6669  # the files' shuffle has its own key: it never reuses the synthetic stream's


class UnreadableFile(DataFileError):
    """A data file that could not be read (an I/O error): it may pass, so the index does not remember it."""


class BadData(DataFileError):
    """A bad row (or file) found while indexing. Every process reads the same files and meets it alike, or
    reads it from the index's record, so the main process says it for all."""

    every_rank = False


class DamagedIndex(DataFileError):
    """An index whose bytes no longer hash to the sha256 recorded when it was built; this process found
    it and says it (``every_rank``)."""


def cache_root(option: Optional[str]) -> Path:
    """Where indexes live: --data-cache, else $DISTSEQ_CACHE, else the user's cache directory."""
    if option:
        return Path(option).expanduser().absolute()
    if os.environ.get("DISTSEQ_CACHE"):
        return Path(os.environ["DISTSEQ_CACHE"]).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).absolute() / "distseq"


@dataclass(frozen=True)
class RowShape:
    """What every row must be, hence what an index holds: part of its cache key. The task is there too:
    an index remembers a bad row's message, which names the task."""

    task: str
    sequence_column: str
    label_column: str
    seq_len: int
    min_seq_len: int
    features: int
    head: str
    classes: int  # the classes head's count, a per-step head's outputs; 0 for the others
    vocab: int = 0  # a token task's: x holds ids in [0, vocab) (exact in float32: MAX_VOCAB is 2**24)

    @classmethod
    def of(cls, task: Task, spec: TaskSpec, sequence_column: str, label_column: str) -> "RowShape":
        classes = task.num_outputs(spec) if task.head in ("classes", "per-step") else 0
        return cls(task.name, sequence_column, label_column, spec.seq_len, spec.min_seq_len, task.num_features(spec),
                   task.head, classes, task.vocab(spec) if task.tokens else 0)

    @property
    def per_step(self) -> bool:
        return self.head == "per-step"

    @property
    def row_bytes(self) -> int:
        """Bytes of one row in the index: x, y (int64 classes, T int64 per-step labels, else float32), length."""
        label = 8 * self.seq_len if self.per_step else 8 if self.head == "classes" else 4
        return 4 * self.seq_len * self.features + label + 4


@dataclass
class IndexedFile:
    """One file's entry as it was indexed: the file's identity then (``filestat``: ctime and inode None when
    unknown) and its index."""

    path: str
    arrow: str  # the index file
    rows: int
    size: int
    mtime_ns: int
    ctime_ns: Optional[int]
    ino: Optional[int]
    sha256: str  # of the file's bytes
    index_sha256: str  # of the index's bytes, when it was built
    built_by: str  # "pid N on HOST"

    @classmethod
    def of(cls, path: str, record: dict) -> "IndexedFile":
        return cls(path, record["arrow"], record["rows"], record["size"], record["mtime_ns"], record.get("ctime_ns"),
                   record.get("ino"), record["sha256"], record["index_sha256"],
                   record.get("built_by", "another process"))

    def change(self) -> Optional[str]:
        """How the file differs from when it was indexed (gone, size, content), None if it does not: a new
        stat alone (a touch, a backup tool, a copy) is checked against the content's sha256, then kept."""
        try:
            how, now = difference(self.path, vars(self))
        except OSError:
            return f"{self.path} is gone"
        if how:
            return f"{self.path} {how}"
        for name, value in now.fields().items():  # the same bytes: hash again only after the next change
            setattr(self, name, value)
        return None


class FileIndex:
    """The rows of all files, in order, as one indexed dataset; opens its memory maps lazily (per
    process: it pickles as paths, so DataLoader workers open their own)."""

    def __init__(self, files: List[IndexedFile], shape: RowShape):
        self.files, self.shape = files, shape
        self.rows = sum(f.rows for f in files)
        self._chunks: Optional[List[Tuple[np.ndarray, np.ndarray, np.ndarray]]] = None
        self._starts: Optional[np.ndarray] = None

    def __getstate__(self) -> dict:
        return {"files": self.files, "shape": self.shape, "rows": self.rows, "_chunks": None, "_starts": None}

    def sample_bytes(self) -> int:
        """Bytes of one sample as the stream carries it: the row, its position and its row id."""
        return self.shape.row_bytes + 8 + 8

    def describe(self) -> str:
        """What the data is, for the run's start line."""
        return f"{self.rows} rows in {len(self.files)} file(s)"

    def identity(self) -> dict:
        """What the rows are, independent of where the files lie: recorded in checkpoints."""
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f"{f.sha256}:{f.rows};".encode())
        return {"rows": self.rows, "files": len(self.files), "sha256": digest.hexdigest()}

    def changed(self) -> Optional[str]:
        """The first file that differs from its index now (size, content, gone), else None."""
        return next(filter(None, (f.change() for f in self.files)), None)

    def damaged(self) -> Optional[str]:
        """The first index whose bytes no longer hash as when it was built, else None: a memory map shows
        bytes written to its file after it was opened. Read again only when the index's stat moved."""
        bad = next((f for f in self.files if not index_intact(f.arrow, f.index_sha256)), None)
        return None if bad is None else f"{bad.arrow}, the index of {bad.path}, was damaged"

    def open(self) -> "FileIndex":
        """Map every index file now (else the first read does): a damaged or vanished one is then one
        line in the main process, not a DataLoader worker's traceback."""
        if self._chunks is None:
            self._open()
        return self

    def _open(self) -> None:
        import pyarrow as pa

        chunks, starts = [], [0]
        for f in self.files:
            if not index_intact(f.arrow, f.index_sha256):  # read once per process: free after IndexCache.stale
                raise DamagedIndex(f"{f.arrow}, the index of {f.path}, was damaged after this run checked it; run "
                                   f"again: distseq indexes the file again (a run resumes from its last checkpoint)")
            try:
                table = pa.ipc.open_stream(pa.memory_map(f.arrow)).read_all()
            except (OSError, pa.ArrowInvalid) as error:
                raise DataFileError(f"{f.path}: its index {f.arrow} cannot be read ({str(error).splitlines()[0]}); "
                                    f"another job may have indexed the file again: restart the run") from None
            if table.num_rows != f.rows:
                raise DataFileError(f"{f.path}: its index {f.arrow} holds {table.num_rows} rows, not {f.rows}: it was "
                                    f"damaged after this run opened it; restart the run")
            for batch in table.to_batches():
                x = batch.column("x").flatten().to_numpy(zero_copy_only=True)
                y = batch.column("y")
                y = y.flatten().to_numpy().reshape(batch.num_rows, -1) if self.shape.per_step else y.to_numpy()
                chunks.append((x.reshape(batch.num_rows, -1), y, batch.column("length").to_numpy()))
                starts.append(starts[-1] + batch.num_rows)
        self._chunks, self._starts = chunks, np.asarray(starts, dtype=np.int64)

    def take(self, ids: torch.Tensor) -> Batch:
        """Rows ``ids`` (int64, any order) -> ``x`` (n, T, F) float32 (a token task's (n, T) int64 ids), ``y`` (n,)
        (a per-step task's (n, T) int64), ``lengths`` (n,) int64."""
        if self._chunks is None:
            self._open()
        ids_np = ids.numpy()
        chunk_of = np.searchsorted(self._starts, ids_np, side="right") - 1  # (n,)
        n, shape = len(ids_np), self.shape
        first = self._chunks[0]
        x = np.empty((n, first[0].shape[1]), dtype=np.float32)
        y, lengths = np.empty((n, *first[1].shape[1:]), dtype=first[1].dtype), np.empty(n, dtype=np.int64)
        if n and chunk_of[0] == chunk_of[-1] and (chunk_of == chunk_of[0]).all():
            groups = [(int(chunk_of[0]), slice(None))]
        else:  # rows from several record batches: gather from each the rows it holds
            order = np.argsort(chunk_of, kind="stable")
            bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
            groups = [(int(chunk_of[part[0]]), part) for part in np.split(order, bounds) if len(part)]
        for chunk, where in groups:
            cx, cy, clen = self._chunks[chunk]
            local = ids_np[where] - self._starts[chunk]
            x[where], y[where], lengths[where] = cx[local], cy[local], clen[local]
        inputs = torch.from_numpy(x)
        inputs = inputs.view(n, shape.seq_len).long() if shape.vocab else inputs.view(n, shape.seq_len, shape.features)
        return {"x": inputs, "y": torch.from_numpy(y), "lengths": torch.from_numpy(lengths)}


_VERIFIED: Dict[str, FileStat] = {}  # index files whose bytes hashed as recorded, at this stat of theirs


def index_intact(arrow: str, sha256: Optional[str]) -> bool:
    """Whether the index file's bytes hash to ``sha256`` (recorded when it was built): read once per process
    per stat of the file (about 0.35 s per 10^7 rows of seq 10, measured), so that damage is found before a
    row of it is used, and any write to it after that (which moves its ctime) is looked at again."""
    try:
        stat = FileStat.of(arrow)
    except OSError:
        return False
    if _VERIFIED.get(arrow) == stat:
        return True
    if sha256 is None or sha256_file(arrow) != sha256:
        return False
    _VERIFIED[arrow] = stat
    return True


class FileSource:
    """Samples of an index (a FileIndex's rows, a TokenIndex's windows) at stream positions: the synthetic
    ``SampleSource``'s interface (``samples``, ``runs``, ``sample_bytes``). It serves the samples
    ``[first, first + count)`` (all of them by default; a held-out share is the rest). ``seed`` None keeps
    the files' order (evaluation), else each epoch is a fresh seeded permutation of those samples."""

    def __init__(self, index: FileIndex, seed: Optional[int], variable: bool, first: int = 0,
                 count: Optional[int] = None):
        self.index, self.seed, self.variable = index, seed, variable
        self.first, self.count = first, index.rows - first if count is None else count
        self._permutation = LRU(2, self._make_permutation)

    def sample_bytes(self) -> int:
        return self.index.sample_bytes()

    def _make_permutation(self, epoch: int) -> Permutation:
        keys = tuple(derive_seed(self.seed, ORDER_KEY, epoch, r) for r in range(Permutation.ROUNDS))
        return Permutation(self.count, keys)

    def row_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return self.first + self._offsets(positions)

    def _offsets(self, positions: torch.Tensor) -> torch.Tensor:
        n = self.count
        epochs, offsets = positions // n, positions % n
        if self.seed is None:
            return offsets
        first = int(epochs[0])
        if int(epochs[-1]) == first and bool((epochs == first).all()):  # one epoch (the usual case): no masks
            return self._permutation(first)(offsets)
        ids = torch.empty_like(positions)
        for epoch in torch.unique(epochs).tolist():  # index_select/index_copy_: boolean masks cost ~1 ms each
            where = torch.nonzero(epochs == epoch).squeeze(1)
            ids.index_copy_(0, where, self._permutation(epoch)(offsets.index_select(0, where)))
        return ids

    def samples(self, positions: torch.Tensor) -> Batch:
        batch = self.index.take(self.row_ids(positions))
        if not self.variable:
            batch.pop("lengths", None)
        batch["index"] = positions
        return batch

    def runs(self, runs: List[Tuple[int, int]]) -> Batch:
        return self.samples(torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in runs]))


# --- building -----------------------------------------------------------------------------------
def _is_number(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def _list_depth(arrow_type) -> int:
    """1 for a list of numbers, 2 for a list of lists of numbers, 0 for anything else."""
    import pyarrow as pa

    depth = 0
    while pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        arrow_type, depth = arrow_type.value_type, depth + 1
    return depth if _is_number(arrow_type) and depth in (1, 2) else 0


def _first_bad_row(table, bad: np.ndarray, first_row: int, path: str, task: Task, spec: TaskSpec,
                   shape: RowShape) -> DataFileError:
    """The one-line error of the first row flagged ``bad``: ``row_to_sample``'s message on that row."""
    i = int(np.argmax(bad))
    where = f"{path}: row {first_row + i} (from 0)"
    row = table.slice(i, 1).to_pylist()[0]
    try:
        row_to_sample({"file": path, "row": first_row + i, "data": row}, shape.sequence_column, shape.label_column,
                      task, spec)
    except DataFileError as error:
        return error
    return DataFileError(f"{where}: {shape.sequence_column!r} or {shape.label_column!r} cannot be used")


def convert(table, first_row: int, path: str, task: Task, spec: TaskSpec, shape: RowShape
            ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a table of rows (the two columns) and convert it: x (n, T*F) float32 zero-padded, y, lengths
    (n,) int32. Raises the first bad row's DataFileError. Vectorised: no Python per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sequence, label = (table.column(c) for c in (shape.sequence_column, shape.label_column))
    sequence = sequence.combine_chunks() if isinstance(sequence, pa.ChunkedArray) else sequence
    label = label.combine_chunks() if isinstance(label, pa.ChunkedArray) else label
    n, T, F = len(sequence), shape.seq_len, shape.features
    depth = _list_depth(sequence.type)
    bad = np.zeros(n, dtype=bool)
    label_ok = _list_depth(label.type) == 1 if shape.per_step else _is_number(label.type)
    if depth == 0 or (depth == 1 and F != 1) or not label_ok or (shape.vocab and depth != 1):
        bad[:] = True  # every row: the first one's message says what is wrong
        raise _first_bad_row(table, bad, first_row, path, task, spec, shape)
    bad |= sequence.is_null().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(sequence).fill_null(0).to_numpy(zero_copy_only=False)  # (n,)
    bad |= (lengths < shape.min_seq_len) | (lengths > T)
    step_rows = pc.list_parent_indices(sequence).to_numpy()  # the row of each step
    steps = pc.list_flatten(sequence)
    if depth == 2:  # each step a list of F numbers
        bad[step_rows[steps.is_null().to_numpy(zero_copy_only=False)]] = True
        inner = pc.list_value_length(steps).fill_null(-1).to_numpy(zero_copy_only=False)
        bad[step_rows[inner != F]] = True
        value_rows = step_rows[pc.list_parent_indices(steps).to_numpy()]
        values = pc.list_flatten(steps)
    else:
        value_rows, values = step_rows, steps
    with np.errstate(over="ignore", invalid="ignore"):  # float32 overflow becomes inf: flagged below
        numbers = pc.cast(values, pa.float64(), safe=False).to_numpy(zero_copy_only=False).astype(np.float32)
        bad[value_rows[~np.isfinite(numbers)]] = True  # nulls are NaN here
        if shape.vocab:  # token ids: integers in [0, vocab)
            bad[value_rows[(numbers != np.floor(numbers)) | (numbers < 0) | (numbers >= shape.vocab)]] = True
        if shape.per_step:
            y = _step_labels(label, lengths, bad, shape)
        else:
            y = pc.cast(label, pa.float64(), safe=False).to_numpy(zero_copy_only=False)  # (n,), nulls NaN
            bad |= ~np.isfinite(y) | ~np.isfinite(y.astype(np.float32))
        if shape.head == "binary":
            bad |= (y != 0) & (y != 1)
        elif shape.head == "classes":
            bad |= (y != np.floor(y)) | (y < 0) | (y >= shape.classes)
    if bad.any():
        raise _first_bad_row(table, bad, first_row, path, task, spec, shape)
    x = np.zeros((n, T, F), dtype=np.float32)
    if len(numbers) == n * T * F:  # every row full length: the values are x already
        x[:] = numbers.reshape(n, T, F)
    else:
        row_starts = np.cumsum(lengths) - lengths
        step_in_row = np.arange(len(step_rows)) - np.repeat(row_starts, lengths)
        x[step_rows, step_in_row] = numbers.reshape(-1, F)
    y_out = y if shape.per_step else y.astype(np.int64) if shape.head == "classes" else y.astype(np.float32)
    return x.reshape(n, T * F), y_out, lengths.astype(np.int32)


def _step_labels(label, lengths: np.ndarray, bad: np.ndarray, shape: RowShape) -> np.ndarray:
    """A per-step task's label lists -> (n, T) int64, IGNORE where null and past each row's end; flags in ``bad``
    the rows whose list is missing, of another length than the sequence, or holds other than a class or -100."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n, T = len(label), shape.seq_len
    count = pc.list_value_length(label).fill_null(-1).to_numpy(zero_copy_only=False)  # (n,)
    bad |= label.is_null().to_numpy(zero_copy_only=False) | (count != lengths)
    rows = pc.list_parent_indices(label).to_numpy()
    values = pc.list_flatten(label)
    with np.errstate(invalid="ignore"):
        v = pc.cast(values, pa.float64(), safe=False).to_numpy(zero_copy_only=False)  # nulls NaN
        v = np.where(np.isnan(v) & values.is_null().to_numpy(zero_copy_only=False), IGNORE, v)
        wrong = ~np.isfinite(v) | (v != np.floor(v)) | (((v < 0) | (v >= shape.classes)) & (v != IGNORE))
    bad[rows[wrong]] = True
    y = np.full((n, T), IGNORE, dtype=np.int64)
    fits = ~bad[rows]
    starts = np.cumsum(count.clip(0)) - count.clip(0)
    step = np.arange(len(rows)) - starts[rows]
    keep = fits & (step < T)
    y[rows[keep], step[keep]] = v[keep].astype(np.int64)
    return y


JSON_GROUP_LINES = 4096  # lines parsed at once while looking for the row pyarrow refuses


def _json_row(path: str, row: int, line: bytes) -> dict:
    """One line of a JSON-lines file as ``row_to_sample``'s input; a one-line error if it is not an object."""
    try:
        data = json.loads(line)
    except ValueError as error:
        raise DataFileError(f"{path}: row {row} (from 0): not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise DataFileError(f"{path}: row {row} (from 0): not a JSON object")
    return {"file": path, "row": row, "data": data}


def _line_groups(path: str) -> Iterator[Tuple[int, List[bytes]]]:
    """(row of the first line, the non-blank lines) in groups of JSON_GROUP_LINES, streamed."""
    group, first = [], 0
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                group.append(line)
                if len(group) == JSON_GROUP_LINES:
                    yield first, group
                    first, group = first + len(group), []
    if group:
        yield first, group


@dataclass(frozen=True)
class JsonReading:
    """How pyarrow reads a JSON-lines file: one-feature steps as numbers or as 1-number lists (steps of
    several features are always lists), and the block size (a row must fit in one block)."""

    nested: bool
    block_bytes: int


class ReadAgain(Exception):
    """pyarrow needs other options for this JSON-lines file; ``args[0]`` is the next JsonReading."""


def _json_options(shape: RowShape, nested: bool):
    import pyarrow as pa
    import pyarrow.json as pj

    number = pa.int64() if shape.vocab else pa.float64()  # token ids: a float among them is a bad row
    step_type = pa.list_(number) if nested or shape.features > 1 else number
    label = pa.list_(pa.float64()) if shape.per_step else pa.float64()  # integers checked after: 1.0 is a class
    schema = pa.schema([(shape.sequence_column, pa.list_(step_type)), (shape.label_column, label)])
    return pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")


def _read_parquet(path: str, shape: RowShape, rows_per_chunk: int) -> Iterator[Tuple[object, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = os.path.getsize(path)
    try:
        reader = pq.ParquetFile(path)
        total = max(1, reader.metadata.num_rows)
        for batch in reader.iter_batches(batch_size=rows_per_chunk,
                                         columns=[shape.sequence_column, shape.label_column]):
            yield pa.Table.from_batches([batch]), size * batch.num_rows // total
    except OSError as error:
        raise UnreadableFile(f"{path}: cannot read: {error.strerror or error}") from None
    except pa.ArrowException as error:
        raise DataFileError(f"{path}: cannot read: {str(error).splitlines()[0]}") from None


def _read_json(path: str, shape: RowShape, task: Task, spec: TaskSpec, rows_per_chunk: int,
               reading: JsonReading) -> Iterator[Tuple[object, int]]:
    import pyarrow as pa
    import pyarrow.json as pj

    options = _json_options(shape, reading.nested)
    pending, pending_rows = [], 0
    try:
        reader = pj.open_json(path, read_options=pj.ReadOptions(block_size=reading.block_bytes), parse_options=options)
        for batch in reader:
            pending.append(batch)
            pending_rows += batch.num_rows
            if pending_rows >= rows_per_chunk:  # pyarrow makes a batch of each block: about block_bytes of the file
                yield pa.Table.from_batches(pending), len(pending) * reading.block_bytes
                pending, pending_rows = [], 0
    except pa.ArrowInvalid as error:
        message = str(error)
        if "straddl" in message and reading.block_bytes < MAX_JSON_BLOCK_BYTES:  # a row longer than a block
            raise ReadAgain(JsonReading(reading.nested, reading.block_bytes * 8)) from None
        if shape.features == 1 and not reading.nested and "changed from number to array" in message:
            raise ReadAgain(JsonReading(True, reading.block_bytes)) from None  # steps written as [v]
        raise _json_error(path, shape, task, spec, reading, error) from None
    except OSError as error:
        raise UnreadableFile(f"{path}: cannot read: {error.strerror or error}") from None
    if pending:
        yield pa.Table.from_batches(pending), len(pending) * reading.block_bytes


def _json_error(path: str, shape: RowShape, task: Task, spec: TaskSpec, reading: JsonReading,
                error: Exception) -> DataFileError:
    """The one-line error of the first row of a JSON-lines file that pyarrow refused, by its number in the file
    (pyarrow counts rows within its block). pyarrow parses groups of lines, then each line of the first group
    it refuses; the rows of that group up to the refused one then go through ``row_to_sample`` in order, for
    its messages (a string among numbers, a missing label); pyarrow's own message names what Python would
    accept (a duplicated key). One-feature steps may be numbers or 1-number lists: lines are refused only
    when pyarrow reads them in neither form. Streamed: no file is held in memory."""
    import pyarrow as pa
    import pyarrow.json as pj

    forms = [_json_options(shape, nested) for nested in ((reading.nested, not reading.nested)
                                                           if shape.features == 1 else (True,))]

    def refuses(lines: List[bytes]) -> Optional[str]:
        """pyarrow's message when it reads ``lines`` in no form, else None."""
        data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
        messages = []
        for options in forms:
            try:
                pj.read_json(pa.BufferReader(data), parse_options=options,
                             read_options=pj.ReadOptions(block_size=max(len(data) + 1, reading.block_bytes)))
                return None
            except pa.ArrowInvalid as refusal:
                messages.append(str(refusal).splitlines()[0])
        return messages[0]

    for first, group in _line_groups(path):
        if refuses(group) is None:
            continue
        for offset, line in enumerate(group):
            row_to_sample(_json_row(path, first + offset, line), shape.sequence_column, shape.label_column, task, spec)
            reason = refuses([line])
            if reason:
                return DataFileError(f"{path}: row {first + offset} (from 0): cannot parse: "
                                     f"{re.sub(r' in row 0$', '', reason)}")
    return DataFileError(f"{path}: cannot parse: {str(error).splitlines()[0]} (the row counted within a block of "
                         f"{reading.block_bytes} bytes; rows that write one-feature steps both as numbers and as "
                         f"[v] lists cannot be read together)")


@contextlib.contextmanager
def index_writer(arrow: Path, schema) -> Iterator:
    """An Arrow stream writer into a temporary name beside ``arrow``: synced and renamed to ``arrow`` when the
    block ends, removed when it raises (nobody ever reads half of an index)."""
    import pyarrow as pa

    tmp = arrow.with_name(f".tmp-{os.getpid()}-{arrow.name}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            yield writer
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, arrow)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def finish_index(path: str, arrow: Path) -> Tuple[str, str]:
    """(sha256 of the file's bytes, sha256 of its new index); this process has just read the index, so it is
    not hashed again when opened."""
    index_sha = sha256_file(arrow)
    _VERIFIED[str(arrow)] = FileStat.of(str(arrow))
    return sha256_file(path), index_sha


def _build(path: str, arrow: Path, shape: RowShape, task: Task, spec: TaskSpec, advance: Callable[[int], None]
           ) -> Tuple[int, str, str]:
    """Validate and convert ``path`` into the Arrow file ``arrow`` (written under a temporary name, then
    renamed); returns (rows, sha256 of the file's bytes, sha256 of the index's)."""
    import pyarrow as pa

    label = (pa.list_(pa.int64(), shape.seq_len) if shape.per_step else
             pa.int64() if shape.head == "classes" else pa.float32())
    schema = pa.schema([("x", pa.list_(pa.float32(), shape.seq_len * shape.features)), ("y", label),
                        ("length", pa.int32())])
    rows_per_chunk = max(1, CHUNK_BYTES // shape.row_bytes)
    reading = JsonReading(nested=False, block_bytes=JSON_BLOCK_BYTES)
    size, reported = os.path.getsize(path), 0  # bytes of the file the progress bar was told of
    while True:
        rows = 0
        tables = (_read_parquet(path, shape, rows_per_chunk) if file_format(path) == "parquet" else
                  _read_json(path, shape, task, spec, rows_per_chunk, reading))
        try:
            with index_writer(arrow, schema) as writer:
                for table, covered in tables:
                    x, y, lengths = convert(table, rows, path, task, spec, shape)
                    flat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
                    labels = (pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), shape.seq_len)
                              if shape.per_step else pa.array(y))
                    writer.write_batch(pa.record_batch([flat, labels, pa.array(lengths)], schema=schema))
                    rows += len(y)
                    covered = min(covered, size - reported)
                    advance(covered)
                    reported += covered
                advance(size - reported)
                if rows == 0:
                    raise DataFileError(f"{path} has no rows (every file of --data-files must hold some)")
            break
        except ReadAgain as again:
            reading = again.args[0]
    return (rows, *finish_index(path, arrow))


class IndexCache:
    """The directory of indexes: finds a file's entry, builds it when missing or stale."""

    def __init__(self, root: Path, shape: RowShape, task: Task, spec: TaskSpec):
        self.dir, self.shape, self.task, self.spec = Path(root) / "files", shape, task, spec

    def _build_file(self, path: str, arrow: Path, advance: Callable[[int], None]) -> Tuple[int, str, str]:
        """Index ``path`` into ``arrow``: (rows, sha256 of the file, sha256 of the index)."""
        return _build(path, arrow, self.shape, self.task, self.spec, advance)

    def _fits(self, table, record: dict) -> bool:
        """Whether an index table (opened from its memory map) holds what its record and this shape say."""
        return table.num_rows == record.get("rows") and \
            table.schema.field("x").type.list_size == self.shape.seq_len * self.shape.features

    def _name(self, path: str) -> str:
        key = json.dumps({"path": os.path.abspath(path), "shape": asdict(self.shape), "version": INDEX_VERSION},
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    def record(self, path: str) -> Optional[dict]:
        try:
            return json.loads((self.dir / f"{self._name(path)}.json").read_text())
        except (OSError, ValueError):
            return None

    def stale(self, path: str) -> Optional[str]:
        """Why ``path`` needs indexing ("new", or how it changed), None when its entry is current."""
        return self._look(path)[0]

    def _look(self, path: str) -> Tuple[Optional[str], Optional[dict], Optional[FileStat]]:
        """(why ``path`` needs indexing or None, its record, its stat now). A file whose stat alone moved
        (a touch, a copy that kept the bytes) is current if its bytes still hash to the recorded sha256."""
        record = self.record(path)
        if record is None:
            return "new", None, None
        how, now = difference(path, record)
        if how:
            return f"{how} since it was indexed", record, now
        if "error" in record:
            return None, record, now  # this version of the file is known bad: entry() says why
        if not Path(record.get("arrow", "")).is_file():
            return "lost its index", record, now
        return self._unusable(record), record, now

    def _unusable(self, record: dict) -> Optional[str]:
        """Why the index file cannot serve, None if its bytes hash as recorded when it was built and it
        opens (its memory map: no copy) with the recorded rows and this row shape."""
        import pyarrow as pa

        if "index_sha256" not in record:
            return "has an index without its sha256 (an older distseq's)"
        if not index_intact(record["arrow"], record["index_sha256"]):
            return "has a damaged index"
        try:
            table = pa.ipc.open_stream(pa.memory_map(record["arrow"])).read_all()
            intact = self._fits(table, record)
        except (OSError, KeyError, AttributeError, pa.ArrowException):
            return "has a damaged index"
        return None if intact else "has a damaged index"

    def entry(self, path: str, advance: Callable[[int], None]) -> IndexedFile:
        """``path``'s current entry, built first when it is missing or stale, under an exclusive lock of
        the entry: one builder at a time across the processes of a job and across jobs."""
        name = self._name(path)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.dir / f"{name}.lock", "a+")
        except OSError as error:
            raise _every_rank(ConfigError("--data-cache", f"cannot write indexes in {self.dir}: "
                                          f"{error.strerror or error} (choose a writable directory)")) from None
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as error:  # e.g. a Lustre mount without -o flock
                raise _every_rank(ConfigError("--data-cache", f"{self.dir} does not support file locks "
                                              f"({error.strerror or error}); choose a local directory")) from None
            try:
                record = self._current_record(path, name, advance)
            except OSError as error:
                raise _every_rank(RunIOError(f"cannot write the index of {path} in {self.dir}: "
                                             f"{error.strerror or error} (nothing of the run was written; "
                                             f"--data-cache chooses another place)")) from None
        if "error" in record:  # found by whoever indexed this version of the file: every process says the same
            raise BadData(record["error"])
        return IndexedFile.of(path, record)

    def _current_record(self, path: str, name: str, advance: Callable[[int], None]) -> dict:
        """The entry's record, once current (under its lock): built again when stale, else with the file's
        stat now when the bytes were verified by their hash (a touch, a copy, a record older than some of
        the stat's fields), so the next look need not read them."""
        reason, record, now = self._look(path)
        if reason is None:
            if any(record.get(key) != value for key, value in now.fields().items()):
                record.update(now.fields())
                with contextlib.suppress(OSError):  # a read-only cache still serves: the next look hashes again
                    write_json(self.dir / f"{name}.json", record)
            return record
        self._rebuild(path, name, advance)
        record = self.record(path)
        if record is None:
            raise _every_rank(DataFileError(f"{path}: its index record vanished from {self.dir} while "
                                            f"this run read it (was the cache cleaned?); run again"))
        return record

    def _rebuild(self, path: str, name: str, advance: Callable[[int], None]) -> None:
        """Index ``path`` and record it; a bad row is recorded too (for this version of the file: its stat
        and sha256), so the other processes of the job, and later runs, report it without indexing the file
        again. Runs under the entry's lock, so whatever else of this entry lies in the cache (an older index,
        a build killed half-way) is no one's: it is removed (a job that maps an older index keeps its copy
        on a local file system)."""
        stat = FileStat.of(path)
        arrow = self.dir / f"{name}-{stat.mtime_ns}-{stat.size}{self._version_tag(path)}.arrow"
        started = time.perf_counter()
        record = {"path": os.path.abspath(path), **stat.fields(), "shape": asdict(self.shape),
                  "version": INDEX_VERSION, "built_by": builder()}
        try:
            rows, sha, index_sha = self._build_file(path, arrow, advance)
        except UnreadableFile:  # an I/O error may pass: not remembered
            raise
        except DataFileError as error:
            with contextlib.suppress(OSError):
                write_json(self.dir / f"{name}.json", {**record, **self._extra(path), "sha256": sha256_file(path),
                                                       "error": str(error)})
                self._remove_others(name, keep=None)
            raise BadData(str(error)) from None
        if FileStat.of(path) != stat:
            os.unlink(arrow)
            raise _every_rank(DataFileError(f"{path} changed while it was being indexed; run again when it is "
                                            f"complete"))
        record.update(arrow=str(arrow), rows=rows, sha256=sha, index_sha256=index_sha, index_bytes=arrow.stat().st_size,
                      seconds=round(time.perf_counter() - started, 3), **self._extra(path))
        write_json(self.dir / f"{name}.json", record)
        self._remove_others(name, keep=arrow)

    def _version_tag(self, path: str) -> str:
        """More of an index file's name, for what else its version depends on: a new version never takes the name
        a running job mapped (it would read that as damage)."""
        return ""

    def _extra(self, path: str) -> dict:
        """More of the record, for a kind of index whose identity has more than the file (a .bin's offsets)."""
        return {}

    def _remove_others(self, name: str, keep: Optional[Path]) -> None:
        for other in [*self.dir.glob(f"{name}-*.arrow"), *self.dir.glob(f".tmp-*-{name}-*.arrow")]:
            if other != keep:
                with contextlib.suppress(OSError):
                    os.unlink(other)


def builder() -> str:
    """Who builds an index, as its record and the processes that waited for it say."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _every_rank(error: DistseqError) -> DistseqError:
    """An error this process met on its own (its disk, its timing): it prints it itself."""
    error.every_rank = True
    return error


def check_same_everywhere(index: FileIndex, accelerator) -> None:
    """Every process indexed the same rows (nodes with their own copies of the data may differ): one
    all-gather of the identities; a difference would silently duplicate and drop samples."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    identities = gather_object([index.identity()])  # (world,) on every rank
    differ = [rank for rank, identity in enumerate(identities) if identity != identities[0]]
    if differ:
        first, theirs = identities[0], identities[differ[0]]
        raise BadData(f"--data-files differ between processes: rank {differ[0]} reads {theirs['rows']} rows "
                      f"(sha256 {theirs['sha256'][:12]}), rank 0 {first['rows']} (sha256 {first['sha256'][:12]}); "
                      f"{len(differ)} rank(s) differ from rank 0: give every node the same files")


def open_index(files: List[str], task: Task, spec: TaskSpec, sequence_column: str, label_column: str,
               cache: Optional[str], say: Callable[[str], None], progress: bool) -> FileIndex:
    """The index of ``files`` (built where missing or stale, with a progress bar), ready to read."""
    shape = RowShape.of(task, spec, sequence_column, label_column)
    check_files(files, sequence_column, label_column)
    indexed, seconds = index_files(files, IndexCache(cache_root(cache), shape, task, spec), say, progress)
    index = FileIndex(indexed, shape)
    if seconds is not None:
        say(f"distseq: indexed {index.rows} rows of {len(files)} file(s) in {seconds:.1f} s")
    return index


def index_files(files: List[str], index_cache: IndexCache, say: Callable[[str], None], progress: bool
                ) -> Tuple[List[IndexedFile], Optional[float]]:
    """Each file's current entry, built where missing or stale (with a progress bar and a line saying so); and
    the seconds this process spent building, None when it built none itself."""
    from tqdm.auto import tqdm

    reasons = {path: index_cache.stale(path) for path in files}
    to_build = [path for path, reason in reasons.items() if reason]
    for path in to_build:
        if reasons[path] != "new":
            say(f"distseq: {path} {reasons[path]}: indexing it again")
    total = sum(os.path.getsize(path) for path in to_build)
    if to_build:
        say(f"distseq: indexing {len(to_build)} of {len(files)} data file(s) ({total / 1e6:.1f} MB) into "
            f"{index_cache.dir}")
    started = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="indexing", disable=not (progress and to_build)) as bar:
        indexed = [index_cache.entry(path, bar.update) for path in files]
        waited = [f for f in indexed if reasons[f.path] and f.built_by != builder()]
        bar.update(sum(f.size for f in waited))
    for f in waited:  # another process held the entry's lock and built it: this one said "indexing" too
        say(f"distseq: {f.path} was indexed by {f.built_by} while this process waited for it: using that index")
    return indexed, (time.perf_counter() - started if len(waited) < len(to_build) else None)
