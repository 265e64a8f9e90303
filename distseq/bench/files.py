"""The files suite: ``--data-files`` read through the index against raw pyarrow, in one run.

Rows/s of the trainer's stream over an indexed file (``open_index``, ``FileSource``, ``train_loader``,
``micro_batches``; micro-batch 256, 0 workers, the default example grouping, positions from 0) are
compared with a raw pyarrow reader handed **the same row ids in the same order**
(``FileSource.row_ids``, computed before timing): for each micro-batch ``table.take(ids)`` converted to
torch tensors, x (n, T, 1) float32 and the labels (and the lengths for variable-length rows). The
reference reads the whole file into memory first (``pq.read_table`` / ``pyarrow.json.read_json``, then
``combine_chunks``) and that load is **not timed**: the reference is the in-memory best case, where
distseq reads a memory-mapped index and computes its shuffle. Both sides are timed over the same rows,
alternating, the median of 3 each (1 with ``--quick``); a digest of the rows each side read (a separate,
untimed pass) shows they read the same bytes in the same order.

Three cases: fixed-length float sequences from parquet (``files_ratio``; the dataset the index is built
from), the same from JSON lines (``files_ratio_jsonl``) and variable-length rows from parquet
(``files_ratio_variable``: the reference pads list rows with numpy, the index holds them padded).
``files_seek_ratio``: time to the first batch at stream position 10^7 / at 0, each time opening the
cached index again (stats and maps), building the loader at ``position // 256`` and taking one
micro-batch; on the 10^7-row dataset the first example there holds rows of epochs 0 and 1 (two
shuffles), on the 10^5 rows of ``--quick`` of epochs 99 and 100. ``files_index_seconds`` /
``files_index_mb``: ``open_index`` of a generated 10^7-row parquet file (10^5 with ``--quick``; just
written, so in the page cache) into an empty cache: validation, conversion, the file's sha256; and
the index's size. Every file and cache lives in a temporary directory, deleted at the end; the
user's cache is never touched.
"""

from __future__ import annotations

import gc
import hashlib
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from distseq.config import DataConfig
from distseq.data.index import FileIndex, FileSource, open_index
from distseq.data.stream import Layout, micro_batches, steps_per_example, train_loader
from distseq.registry import TASKS
from distseq.tasks import TaskSpec

TASK = "sum-sign"
SEQ_LEN, MIN_SEQ_LEN = 10, 5  # variable-length rows: lengths 5..10
MICRO_BATCH = 256
SEEK_POSITION = 10**7
SEQUENCE, LABEL = "sequence", "label"
SEED = 0  # the stream's shuffle (a run's --seed)
ROW_GROUP = 2**20  # rows per row group of the generated parquet files


@dataclass(frozen=True)
class Sizes:
    """How much each measurement reads: the full run, or ``--quick`` (a smoke test of the plumbing)."""

    rows: int  # the generated parquet dataset: indexed, timed (files_ratio) and seeked in
    small_rows: int  # the JSON-lines and variable-length datasets
    timed_examples: int  # stream examples (16,384 rows each) timed per repeat, parquet
    small_timed_examples: int  # the same for the two smaller cases
    repeats: int
    seek_repeats: int


FULL = Sizes(rows=10**7, small_rows=10**6, timed_examples=128, small_timed_examples=48, repeats=3, seek_repeats=7)
QUICK = Sizes(rows=10**5, small_rows=2 * 10**4, timed_examples=2, small_timed_examples=2, repeats=1, seek_repeats=3)


# --- the datasets ---------------------------------------------------------------------------------
def _values_and_labels(rng: np.random.Generator, lengths: np.ndarray):
    """Float32 N(0, 1) values of rows of ``lengths`` (concatenated) and their sum-sign labels (int64)."""
    values = rng.standard_normal(int(lengths.sum()), dtype=np.float32)
    starts = np.cumsum(lengths) - lengths
    labels = (np.add.reduceat(values, starts, dtype=np.float64) > 0).astype(np.int64)
    return values, labels


def _parquet_rows(rng: np.random.Generator, rows: int, variable: bool):
    """One table of ``rows`` sum-sign rows: a fixed-size list column, or a list column of lengths 5..10."""
    import pyarrow as pa

    lengths = rng.integers(MIN_SEQ_LEN, SEQ_LEN + 1, rows) if variable else np.full(rows, SEQ_LEN)
    values, labels = _values_and_labels(rng, lengths)
    if variable:
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        sequence = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    else:
        sequence = pa.FixedSizeListArray.from_arrays(pa.array(values), SEQ_LEN)
    return pa.table({SEQUENCE: sequence, LABEL: pa.array(labels)})


def write_parquet(path: Path, rows: int, variable: bool, seed: int = 0) -> float:
    """A sum-sign parquet file of ``rows`` rows (seq_len 10; lengths 5..10 when ``variable``), built
    from numpy arrays without Python per row, one row group of 2^20 rows at a time (bounded memory);
    returns the seconds it took."""
    import pyarrow.parquet as pq

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, ROW_GROUP):
        table = _parquet_rows(rng, min(ROW_GROUP, rows - start), variable)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return time.perf_counter() - started


def write_jsonl(path: Path, rows: int, seed: int = 0) -> float:
    """A sum-sign JSON-lines file of fixed-length rows (values with 4 decimals); returns its seconds.
    Formatting text is Python per row: this is why the JSON dataset is the smaller one."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    values, _ = _values_and_labels(rng, np.full(rows, SEQ_LEN))
    values = np.round(values.reshape(rows, SEQ_LEN).astype(np.float64), 4)
    labels = (values.sum(1) > 0).astype(np.int64)  # of the values as written
    line = '{"%s": [%s], "%s": %%d}\n' % (SEQUENCE, ", ".join(["%.4f"] * SEQ_LEN), LABEL)
    with open(path, "w") as handle:
        for start in range(0, rows, 65536):
            block = zip(values[start:start + 65536].tolist(), labels[start:start + 65536].tolist())
            handle.write("".join(line % (*x, y) for x, y in block))
    return time.perf_counter() - started


def _index(path: Path, spec: TaskSpec, cache: Path) -> FileIndex:
    return open_index([str(path)], TASKS[TASK], spec, SEQUENCE, LABEL, str(cache), say=lambda line: None,
                      progress=False)


def build_index(path: Path, spec: TaskSpec, cache: Path) -> Tuple[FileIndex, Dict]:
    """Index ``path`` into ``cache`` (no entry for it yet): the index, its seconds and bytes on disk."""
    before = set((cache / "files").glob("*.arrow"))
    started = time.perf_counter()
    index = _index(path, spec, cache)
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in set((cache / "files").glob("*.arrow")) - before)
    return index, {"rows": index.rows, "index_seconds": seconds, "index_mb": size / 1e6,
                   "file_mb": path.stat().st_size / 1e6}


# --- the two readers ------------------------------------------------------------------------------
def _example_rows(source: FileSource) -> int:
    """Rows in one stream example (the unit the stream reads in): 16,384 with the defaults."""
    layout = Layout(MICRO_BATCH, 1, 1)
    return MICRO_BATCH * steps_per_example(layout, DataConfig().samples_per_example, source.sample_bytes())


def distseq_batches(index: FileIndex, variable: bool, first_step: int = 0) -> Iterator[dict]:
    """The trainer's stream over the index: one process, 0 workers, the default example grouping."""
    source = FileSource(index, SEED, variable)
    loader = train_loader(source, Layout(MICRO_BATCH, 1, 1), 0, first_step, 10**9,
                          DataConfig().samples_per_example, 0)
    return micro_batches(loader, MICRO_BATCH)


def load_table(path: Path):
    """The whole file in memory as one chunk per column (the reference's untimed setup), as pyarrow
    reads it: JSON numbers become float64 lists, cast to float32 per micro-batch like any reader's."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).combine_chunks()
    import pyarrow.json as pj

    return pj.read_json(path).combine_chunks()


def _padded(sequence, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """List rows -> (n, T) float32, zero-padded, with numpy (no Python per row)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(sequence).to_numpy()
    x = np.zeros((n, SEQ_LEN), dtype=np.float32)
    x[np.arange(SEQ_LEN) < lengths[:, None]] = sequence.flatten().to_numpy()  # row by row, in order
    return x, lengths.astype(np.int64)


def reference_batches(table, ids: np.ndarray, variable: bool) -> Iterator[dict]:
    """Raw pyarrow: ``table.take`` of each micro-batch's row ids, converted to torch tensors."""
    for start in range(0, len(ids), MICRO_BATCH):
        rows = table.take(ids[start:start + MICRO_BATCH])
        sequence, n = rows.column(SEQUENCE).chunk(0), rows.num_rows
        batch = {"y": torch.from_numpy(rows.column(LABEL).chunk(0).to_numpy())}
        if variable:
            x, lengths = _padded(sequence, n)
            batch["lengths"] = torch.from_numpy(lengths)
        else:
            x = sequence.flatten().to_numpy().astype(np.float32, copy=False)
        batch["x"] = torch.from_numpy(x).view(n, SEQ_LEN, 1)
        yield batch


# --- measuring ------------------------------------------------------------------------------------
def _seconds(batches: Iterator[dict], count: int) -> float:
    """Seconds to take ``count`` micro-batches from ``batches``."""
    started = time.perf_counter()
    for _ in range(count):
        next(batches)
    return time.perf_counter() - started


def digest(batches: Iterator[dict], count: int) -> str:
    """A digest of the rows of ``count`` micro-batches, in order: x as float32, y as float64, lengths
    as int64 (when present), so each side's dtypes do not matter, only the rows."""
    sha = hashlib.sha256()
    for _ in range(count):
        batch = next(batches)
        sha.update(batch["x"].to(torch.float32).contiguous().numpy().tobytes())
        sha.update(batch["y"].to(torch.float64).numpy().tobytes())
        if "lengths" in batch:
            sha.update(batch["lengths"].to(torch.int64).numpy().tobytes())
    return sha.hexdigest()[:16]


def _skipped(batches: Iterator[dict], count: int) -> Iterator[dict]:
    for _ in range(count):
        next(batches)
    return batches


def compare(path: Path, index: FileIndex, variable: bool, examples: int, repeats: int) -> Dict:
    """Rows/s of the stream and of raw pyarrow over the same rows, alternating, medians of ``repeats``.

    The stream's first example (positions [0, E)) is read untimed (the loader's start, the first touch
    of the maps); both sides are then timed over the rows of positions [E, (1 + examples) E), whole
    examples, since the stream reads an example when its first micro-batch is asked for."""
    per_example = _example_rows(FileSource(index, SEED, variable))
    warm, count = per_example // MICRO_BATCH, examples * per_example // MICRO_BATCH
    started = time.perf_counter()
    table = load_table(path)
    load_seconds = time.perf_counter() - started
    positions = torch.arange(per_example, (1 + examples) * per_example, dtype=torch.int64)
    ids = FileSource(index, SEED, variable).row_ids(positions).numpy()
    times = {"distseq": [], "reference": []}
    with warnings.catch_warnings():  # zero-copy views of the table are read-only: torch warns once
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(repeats):
            times["reference"].append(_seconds(reference_batches(table, ids, variable), count))
            times["distseq"].append(_seconds(_skipped(distseq_batches(index, variable), warm), count))
        checks = {"distseq": digest(_skipped(distseq_batches(index, variable), warm), count),
                  "reference": digest(reference_batches(table, ids, variable), count)}
    rows = count * MICRO_BATCH
    rates = {side: rows / statistics.median(seconds) for side, seconds in times.items()}
    return {"ratio": rates["distseq"] / rates["reference"], "distseq_rows_per_sec": rates["distseq"],
            "reference_rows_per_sec": rates["reference"], "timed_rows": rows, "first_position": per_example,
            "repeats_seconds": times, "checksum_distseq": checks["distseq"], "checksum_reference": checks["reference"],
            "reference_load_seconds": load_seconds, "variable": variable}


def first_batch_seconds(path: Path, spec: TaskSpec, cache: Path, position: int) -> float:
    """Open the cached index again, build the stream at ``position`` and take its first micro-batch."""
    started = time.perf_counter()
    next(distseq_batches(_index(path, spec, cache), False, first_step=position // MICRO_BATCH))
    return time.perf_counter() - started


def seek_note(rows: int, example_rows: int) -> str:
    """Where the seek lands: positions cycle epochs, and the first example may hold rows of two."""
    first = SEEK_POSITION // MICRO_BATCH * MICRO_BATCH  # the stream starts at a step
    epochs = " and ".join(str(e) for e in sorted({first // rows, (first + example_rows - 1) // rows}))
    return (f"positions cycle epochs of the {rows:,}-row dataset: the stream at {SEEK_POSITION:,} starts at step "
            f"{first // MICRO_BATCH:,} (position {first:,}) and its first example of {example_rows:,} rows reads "
            f"epoch(s) {epochs}")


def seek(path: Path, spec: TaskSpec, cache: Path, repeats: int) -> Dict:
    """Median first-batch seconds at 0 and at SEEK_POSITION, alternating after one untimed pair."""
    times = {0: [], SEEK_POSITION: []}
    for repeat in range(repeats + 1):
        for position in times:
            seconds = first_batch_seconds(path, spec, cache, position)
            gc.collect()  # the loader's cycles hold each measurement's memory maps (resident pages) otherwise
            if repeat:
                times[position].append(seconds)
    at_zero, far = (statistics.median(times[p]) for p in (0, SEEK_POSITION))
    return {"files_seek_ratio": far / at_zero, "first_batch_seconds_at_0": at_zero,
            "first_batch_seconds_at_seek": far, "seek_position": SEEK_POSITION, "seek_repeats": repeats,
            "example_rows": _example_rows(FileSource(_index(path, spec, cache), SEED, False))}


# --- the suite ------------------------------------------------------------------------------------
def files_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    return files_benchmark(QUICK if quick else FULL, log=log)


def _case(tmp: Path, name: str, rows: int, spec: TaskSpec, sizes: Sizes, examples: int,
          log: Callable[[str], None]) -> Dict:
    """Write one of the smaller datasets, index it, compare the two readers on it."""
    path = tmp / f"{name}.{'jsonl' if name == 'jsonl' else 'parquet'}"
    generate = write_jsonl(path, rows) if name == "jsonl" else write_parquet(path, rows, variable=True)
    index, built = build_index(path, spec, tmp / "cache")
    result = {**built, "generate_seconds": generate, **compare(path, index, spec.variable, examples, sizes.repeats)}
    log(f"files: {name}: {result['ratio']:.3f} ({result['distseq_rows_per_sec']:,.0f} vs "
        f"{result['reference_rows_per_sec']:,.0f} rows/s)")
    return result


def files_benchmark(sizes: Sizes, log: Callable[[str], None] = print, root: Optional[str] = None) -> Dict:
    """Every measurement of the suite, in a temporary directory (``root``: where to make it)."""
    fixed, variable = TaskSpec(SEQ_LEN, SEQ_LEN), TaskSpec(SEQ_LEN, MIN_SEQ_LEN)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="distseq-bench-files-", dir=root) as name:
        tmp = Path(name)
        path = tmp / "fixed.parquet"
        generate = write_parquet(path, sizes.rows, variable=False)
        log(f"files: wrote {sizes.rows:,} rows ({path.stat().st_size / 1e6:.0f} MB of parquet) in {generate:.1f} s")
        index, built = build_index(path, fixed, tmp / "cache")
        log(f"files: indexed them in {built['index_seconds']:.1f} s ({built['index_mb']:.0f} MB)")
        parquet = {**built, "generate_seconds": generate,
                   **compare(path, index, False, sizes.timed_examples, sizes.repeats)}
        log(f"files: parquet: {parquet['ratio']:.3f}")
        seeking = seek(path, fixed, tmp / "cache", sizes.seek_repeats)
        path.unlink()  # the large one: not needed past here
        cases = {"parquet": parquet,
                 "jsonl": _case(tmp, "jsonl", sizes.small_rows, fixed, sizes, sizes.small_timed_examples, log),
                 "variable": _case(tmp, "variable", sizes.small_rows, variable, sizes, sizes.small_timed_examples, log)}
    result = {
        "files_ratio": parquet["ratio"],
        "files_ratio_jsonl": cases["jsonl"]["ratio"],
        "files_ratio_variable": cases["variable"]["ratio"],
        **seeking,
        "files_index_seconds": parquet["index_seconds"],
        "files_index_mb": parquet["index_mb"],
        "files_parquet_mb": parquet["file_mb"],
        "files_generate_seconds": generate,
        "index_rows": sizes.rows,
        "seek_note": seek_note(sizes.rows, seeking["example_rows"]),
        "cases": cases,
        "sizes": asdict(sizes),
        "task": TASK, "seq_len": SEQ_LEN, "min_seq_len": MIN_SEQ_LEN, "micro_batch": MICRO_BATCH,
        "torch_threads": torch.get_num_threads(),
        # the stream's torch ops run on torch_threads threads, the reference's pyarrow take on one: another
        # busy process on the machine slows the stream far more than the reference, so it is recorded
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    log(files_table(result))
    return result


def files_table(r: Dict) -> str:
    names = {"parquet": "parquet, fixed length", "jsonl": "JSON lines, fixed length",
             "variable": f"parquet, lengths {r['min_seq_len']}..{r['seq_len']}"}
    lines = [f"{'files (sum-sign, seq %d, batch %d)' % (r['seq_len'], r['micro_batch']):<34} {'dataset rows':>12} "
             f"{'distseq rows/s':>15} {'pyarrow rows/s':>15} {'ratio':>7} {'index s':>8} {'index MB':>9}"]
    for key, name in names.items():  # in this order: a JSON file sorts the keys of "cases"
        c = r["cases"][key]
        lines.append(f"{name:<34} {c['rows']:>12,} {c['distseq_rows_per_sec']:>15,.0f} "
                     f"{c['reference_rows_per_sec']:>15,.0f} {c['ratio']:>7.3f} {c['index_seconds']:>8.2f} "
                     f"{c['index_mb']:>9.1f}")
    lines.append(f"files_ratio={r['files_ratio']:.3f} (goal >= 0.5; pyarrow reads the file into memory first, "
                 f"untimed)  files_seek_ratio={r['files_seek_ratio']:.3f} (goal <= 1.1; first batch "
                 f"{r['first_batch_seconds_at_0'] * 1000:.1f} ms at 0, "
                 f"{r['first_batch_seconds_at_seek'] * 1000:.1f} ms at {r['seek_position']:,})")
    lines.append(f"files_index_seconds={r['files_index_seconds']:.2f} (goal <= 60) for {r['index_rows']:,} rows: "
                 f"{r['files_parquet_mb']:.0f} MB of parquet -> {r['files_index_mb']:.0f} MB of index "
                 f"(generated in {r['files_generate_seconds']:.1f} s); {r['torch_threads']} torch threads, load "
                 f"average {r['load_average_1min']['before']:.2f} -> {r['load_average_1min']['after']:.2f}")
    return "\n".join(lines)
