"""Adversarial table for the indexed --data-files dataset (distseq/file_index.py).

Bad data: every bad row or file ends the run with one line on stderr, exit 2, naming the file and
the row (counted from 0 within its file, blank lines not counted), before the run dir exists; the
bad rows sit deep in files that span many record batches, parquet row groups and JSON blocks, so a
chunk-relative row number would show. Exactness: rows read back from the index equal the source
rows (values as float32, labels, lengths, zero padding), gathered across chunks in any order.
Shuffle: every epoch a permutation of all rows, per (seed, epoch), rebuilt identically. Cache:
reused, rebuilt on a change with one line of notice, one builder among racing processes, no
debris. Identity: the content, not the path. And a few real training runs that resume (or not).

In-process calls throughout (``open_index``, ``distseq.cli.main``); the race forks three processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, cpu_env, free_port, run_main, summary

import distseq.data.filestat as filestat
import distseq.data.index as fi
from distseq.data.files import resolve_files
from distseq.data.index import FileSource, open_index
from distseq.data.stream import derive_seed
from distseq.tasks.base import TASKS, TaskSpec
from distseq.tasks.sampling import Permutation

T = 6
SUM_SIGN, ADDING = TASKS["sum-sign"], TASKS["adding"]
CLASSES = dataclasses.replace(SUM_SIGN, name="fi-classes", head="classes", num_outputs=lambda spec: 3, label=None)
TASK_OF = {"sum-sign": SUM_SIGN, "adding": ADDING, "fi-classes": CLASSES}


# --- helpers ------------------------------------------------------------------------------------
def make_rows(n: int, seed: int, *, features: int = 1, min_len: int = T, max_len: int = T, classes: int = 2,
              label_kind: str = "int"):
    """(sequences: list of (length, F) float64 arrays, labels: (n,) array)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    seqs = [rng.standard_normal((int(length), features)).round(4) * 3 for length in lengths]
    labels = rng.integers(0, classes, n) if label_kind == "int" else rng.standard_normal(n).round(4)
    return seqs, labels


def as_list(seq: np.ndarray, features: int):
    return seq[:, 0].tolist() if features == 1 else seq.tolist()


def jsonl_line(seq, label, features: int = 1) -> str:
    label = label.item() if isinstance(label, np.generic) else label
    return json.dumps({"sequence": as_list(seq, features), "label": label}, separators=(",", ":"))


def write_jsonl(path: Path, seqs, labels, features: int = 1, newline: str = "\n") -> Path:
    path.write_text("".join(jsonl_line(s, y, features) + newline for s, y in zip(seqs, labels)))
    return path


def sequence_type(features: int, value=pa.float64()):
    return pa.list_(value) if features == 1 else pa.list_(pa.list_(value))


def write_parquet(path: Path, seqs, labels, features: int = 1, row_group_size: Optional[int] = None,
                  seq_type=None, label_type=pa.int64()) -> Path:
    seq_type = seq_type or sequence_type(features)
    table = pa.table({"sequence": pa.array([as_list(s, features) for s in seqs], type=seq_type),
                      "label": pa.array(np.asarray(labels).tolist(), type=label_type)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def expected(seqs, labels, features: int = 1, label_dtype=np.float32):
    n = len(seqs)
    x = np.zeros((n, T, features), dtype=np.float32)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = np.asarray(s, dtype=np.float64).astype(np.float32)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    return x, np.asarray(labels).astype(label_dtype), lengths


def index_of(files, cache, task=SUM_SIGN, spec=TaskSpec(T, T), said=None):
    return open_index([str(f) for f in files], task, spec, "sequence", "label", str(cache),
                      say=said.append if said is not None else (lambda line: None), progress=False)


def read_all(index, variable: bool):
    return FileSource(index, None, variable).samples(torch.arange(index.rows))


def arrow_batches(index) -> int:
    return sum(len(pa.ipc.open_stream(pa.memory_map(f.arrow)).read_all().to_batches()) for f in index.files)


def cache_files(cache: Path, pattern: str):
    return sorted((Path(cache) / "files").glob(pattern))


def train_args(files, tmp_path, *extra, task="sum-sign", run="run"):
    return ["train", "--task", task, "--data-files", ",".join(map(str, files)), "--seq-len", str(T),
            "--global-batch-size", "8", "--max-steps", "6", "--eval-size", "64", "--eval-every", "0",
            "--log-every", "2", "--hidden-size", "8", "--no-progress", "--run-dir", str(tmp_path / run),
            "--data-cache", str(tmp_path / "cache"), *extra]


def cli(args, capsys):
    """``distseq ARGS`` in this process -> CompletedProcess; an exception (a traceback) fails the test."""
    return run_main(args, capsys)


def flipped(path: Path, row: int) -> str:
    """The JSON-lines file's text with row ``row``'s 0/1 label flipped: the same size, other bytes."""
    lines = path.read_text().splitlines(keepends=True)
    old, new = ('"label":0', '"label":1') if '"label":0' in lines[row] else ('"label":1', '"label":0')
    lines[row] = lines[row].replace(old, new)
    return "".join(lines)


def rewrite_putting_back_size_and_mtime(path: Path, text: str, new_inode: bool = False) -> None:
    """Other bytes of the same size, the modification time put back (``touch -r``, ``cp -p``, ``os.utime``
    with the old ns), in place or as a new file renamed over it: only the inode change time (and the inode)
    tell."""
    before = path.stat()
    assert len(text.encode()) == before.st_size and text != path.read_text()
    time.sleep(0.02)  # past a tick of the file system's clock (a few ms): the new ctime is another
    target = path.with_name(path.name + ".new") if new_inode else path
    target.write_text(text)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(target, path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert (after.st_ino != before.st_ino) == new_inode


@pytest.fixture
def settled(monkeypatch):
    """Every stat is trusted at once, as for files written long before they are indexed, so that what a test
    proves is the ctime and inode comparison, not the hash of a file too young to be trusted by stat."""
    monkeypatch.setattr(filestat, "RACY_NS", 0)


@pytest.fixture
def hashes(monkeypatch):
    """The paths whose bytes filestat hashed (to verify a file whose stat moved), in order."""
    seen, real = [], filestat.sha256_file

    def counted(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(filestat, "sha256_file", counted)
    return seen


def record_of(cache: Path) -> dict:
    (record,) = cache_files(cache, "*.json")
    return json.loads(record.read_text())


def assert_one_line_error(proc, tmp_path, *fragments, run="run"):
    err = proc.stderr.strip()
    assert proc.returncode == 2, \
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not (tmp_path / run).exists(), "the run dir was created before the data was checked"
    assert not cache_files(tmp_path / "cache", ".tmp-*"), "a failed build left its temporary file"
    return err


# --- 1. bad data --------------------------------------------------------------------------------
PQ_ROWS, PQ_DEEP, PQ_ROW_GROUP = 80_000, 70_000, 16_384
JS_ROWS, JS_DEEP, JS_BLANK_EVERY = 5_200, 5_000, 997


ONE_STEP = ("--max-steps", "1")  # should a bad row be accepted, the run is short


class Bad(NamedTuple):
    id: str
    task: str
    bad: object  # jsonl: the raw line; parquet: (sequence, label) of the bad row
    message: str
    extra: tuple = ()
    label_type: object = None


@pytest.fixture(scope="module")
def jsonl_bases():
    """Per task: the good lines before and after the bad row (a blank line every JS_BLANK_EVERY lines)."""
    out = {}
    for task, features, label_kind in (("sum-sign", 1, "int"), ("fi-classes", 1, "int"), ("adding", 2, "float")):
        seqs, labels = make_rows(JS_ROWS, 7, features=features, label_kind=label_kind)
        lines = [jsonl_line(s, y, features) for s, y in zip(seqs, labels)]
        text = []
        for i, line in enumerate(lines[:JS_DEEP]):
            text.append(line)
            if i % JS_BLANK_EVERY == 3:
                text.append("   ")  # blank lines are no rows
        out[task] = ("\n".join(text) + "\n", "\n".join(lines[JS_DEEP + 1:]) + "\n")
    return out


@pytest.fixture(scope="module")
def parquet_bases():
    """Per task: PQ_ROWS good rows of T steps (built from flat numpy arrays: no Python per row)."""
    out = {}
    rng = np.random.default_rng(11)
    for task, features in (("sum-sign", 1), ("fi-classes", 1), ("adding", 2)):
        values = pa.array(rng.standard_normal(PQ_ROWS * T * features).round(4))
        if features > 1:
            steps = np.arange(0, PQ_ROWS * T * features + 1, features, dtype=np.int32)
            values = pa.ListArray.from_arrays(pa.array(steps), values)
        sequence = pa.ListArray.from_arrays(pa.array(np.arange(0, PQ_ROWS * T + 1, T, dtype=np.int32)), values)
        labels = rng.integers(0, 2, PQ_ROWS).astype(np.float64) if features == 1 else rng.random(PQ_ROWS).round(4)
        out[task] = pa.table({"sequence": sequence, "label": pa.array(labels)})
        assert out[task].schema.field("sequence").type == sequence_type(features)
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    """Record batches of a few thousand rows, JSON blocks of 16 KiB: a file spans many of both."""
    monkeypatch.setattr(fi, "CHUNK_BYTES", 36 * 3_000)
    monkeypatch.setattr(fi, "JSON_BLOCK_BYTES", 16 << 10)


@pytest.fixture
def classes_task(register):
    register("fi-classes", CLASSES)


S = '{"sequence":%s,"label":1}'
ROW6 = "[0.1,0.2,0.3,0.4,0.5,0.6]"
STEPS = "[[0.1,0],[0.2,0],[0.3,1],[0.4,0],[0.5,1],[0.6,0]]"
NOT_NUMBERS = "'sequence' is not a list of numbers"
NON_FINITE = "'sequence' holds a non-finite number"
BAD_JSONL = [
    Bad("string-in-sequence", "sum-sign", S % '[0.1,"x",0.3,0.4,0.5,0.6]', NOT_NUMBERS),
    Bad("null-in-sequence", "sum-sign", S % "[0.1,null,0.3,0.4,0.5,0.6]", NOT_NUMBERS),
    Bad("list-in-flat-sequence", "sum-sign", S % "[0.1,[0.2],0.3,0.4,0.5,0.6]", NOT_NUMBERS),
    # a boolean is no number (torch.tensor would take it as 1.0): the row is named like any other bad row
    Bad("bool-in-sequence", "sum-sign", S % "[0.1,true,0.3,0.4,0.5,0.6]", "sequence"),
    Bad("object-sequence", "sum-sign", S % '{"a":1}', NOT_NUMBERS),
    Bad("string-sequence", "sum-sign", S % '"0.1,0.2,0.3,0.4,0.5,0.6"', NOT_NUMBERS),
    Bad("too-short", "sum-sign", S % "[0.1,0.2]", "sequence length 2, expected 6"),
    Bad("too-long", "sum-sign", S % "[0.1,0.2,0.3,0.4,0.5,0.6,0.7]", "sequence length 7, expected 6"),
    Bad("empty-sequence", "sum-sign", S % "[]", "sequence length 0, expected 6"),
    Bad("below-min-seq-len", "sum-sign", S % "[0.1,0.2]", "sequence length 2, expected 3..6", ("--min-seq-len", "3")),
    Bad("NaN", "sum-sign", S % "[0.1,NaN,0.3,0.4,0.5,0.6]", NON_FINITE),
    Bad("Infinity", "sum-sign", S % "[0.1,Infinity,0.3,0.4,0.5,0.6]", NON_FINITE),
    Bad("-Infinity", "sum-sign", S % "[0.1,0.2,0.3,0.4,0.5,-Infinity]", NON_FINITE),
    Bad("float32-overflow", "sum-sign", S % "[0.1,1e39,0.3,0.4,0.5,0.6]", NON_FINITE),
    Bad("float64-overflow", "sum-sign", S % "[0.1,1e400,0.3,0.4,0.5,0.6]", NON_FINITE),
    Bad("null-sequence", "sum-sign", S % "null", "missing 'sequence'"),
    Bad("no-sequence", "sum-sign", '{"label":1}', "missing 'sequence'"),
    Bad("null-label", "sum-sign", '{"sequence":%s,"label":null}' % ROW6, "missing 'label'"),
    Bad("no-label", "sum-sign", '{"sequence":%s}' % ROW6, "missing 'label'"),
    Bad("label-3-binary", "sum-sign", '{"sequence":%s,"label":3}' % ROW6, "'label' must be 0 or 1 for --task sum-sign"),
    Bad("label-half-binary", "sum-sign", '{"sequence":%s,"label":0.5}' % ROW6, "'label' must be 0 or 1"),
    Bad("label-NaN", "sum-sign", '{"sequence":%s,"label":NaN}' % ROW6, "'label' is not a number"),
    Bad("bool-label", "sum-sign", '{"sequence":%s,"label":true}' % ROW6, "'label' is not a number (True)"),
    Bad("string-label", "sum-sign", '{"sequence":%s,"label":"1"}' % ROW6, "'label' is not a number ('1')"),
    Bad("list-label", "sum-sign", '{"sequence":%s,"label":[1]}' % ROW6, "'label' is not a number"),
    Bad("class-1.5", "fi-classes", '{"sequence":%s,"label":1.5}' % ROW6, "'label' must be a class in 0..2"),
    Bad("class-3", "fi-classes", '{"sequence":%s,"label":3}' % ROW6, "'label' must be a class in 0..2"),
    Bad("class-minus-1", "fi-classes", '{"sequence":%s,"label":-1}' % ROW6, "'label' must be a class in 0..2"),
    Bad("class-1e20", "fi-classes", '{"sequence":%s,"label":1e20}' % ROW6, "'label' must be a class in 0..2"),
    Bad("adding-steps-of-3", "adding", S % "[[0.1,0,1],[0.2,0,1],[0.3,1,1],[0.4,0,1],[0.5,1,1],[0.6,0,1]]",
        "each step of 'sequence' must hold 2 numbers"),
    Bad("adding-one-step-of-1", "adding", S % "[[0.1,0],[0.2],[0.3,1],[0.4,0],[0.5,1],[0.6,0]]", "'sequence'"),
    Bad("adding-flat-sequence", "adding", S % ROW6, "each step of 'sequence' must hold 2 numbers"),
    Bad("adding-NaN-in-step", "adding", S % "[[0.1,0],[NaN,0],[0.3,1],[0.4,0],[0.5,1],[0.6,0]]", NON_FINITE),
    Bad("adding-too-short", "adding", S % "[[0.1,0]]", "sequence length 1, expected 6"),
    # a label past float32 would train on inf: refused like a value past float32 in the sequence
    Bad("adding-label-float32-overflow", "adding", '{"sequence":%s,"label":1e39}' % STEPS, "'label'"),
    Bad("unparseable-json", "sum-sign", '{"sequence":[0.1, oops],"label":1}', "not valid JSON"),
    Bad("truncated-json", "sum-sign", '{"sequence":[0.1,0.2', "not valid JSON"),
    Bad("array-line", "sum-sign", "[0.1,0.2,0.3,0.4,0.5,0.6]", "not a JSON object"),
    Bad("number-line", "sum-sign", "42", "not a JSON object"),
    # pyarrow refuses what Python's json takes (the last of two keys): the row is still the file's row
    Bad("duplicate-key", "sum-sign", '{"sequence":%s,"label":1,"label":0}' % ROW6, "label"),
]


@pytest.mark.parametrize("case", BAD_JSONL, ids=[c.id for c in BAD_JSONL])
def test_bad_jsonl_row_deep_in_a_file(case, jsonl_bases, small_chunks, classes_task, tmp_path, capsys):
    before, after = jsonl_bases[case.task]
    path = tmp_path / "data.jsonl"
    path.write_text(before + case.bad + "\n" + after)
    proc = cli(train_args([path], tmp_path, *ONE_STEP, *case.extra, task=case.task), capsys)
    assert_one_line_error(proc, tmp_path, f"{path}: row {JS_DEEP} (from 0)", case.message)
    assert not cache_files(tmp_path / "cache", "*.arrow")


def pq_bad(seq, label=1.0):
    return (seq, label)


ROW6_L = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
STEPS_L = [[0.1, 0.0], [0.2, 0.0], [0.3, 1.0], [0.4, 0.0], [0.5, 1.0], [0.6, 0.0]]
BAD_PARQUET = [
    Bad("NaN", "sum-sign", pq_bad([0.1, float("nan"), 0.3, 0.4, 0.5, 0.6]), NON_FINITE),
    Bad("inf", "sum-sign", pq_bad([0.1, 0.2, float("inf"), 0.4, 0.5, 0.6]), NON_FINITE),
    Bad("-inf", "sum-sign", pq_bad([0.1, 0.2, 0.3, 0.4, 0.5, float("-inf")]), NON_FINITE),
    Bad("float32-overflow", "sum-sign", pq_bad([0.1, 0.2, 1e39, 0.4, 0.5, 0.6]), NON_FINITE),
    Bad("null-in-sequence", "sum-sign", pq_bad([0.1, None, 0.3, 0.4, 0.5, 0.6]), NOT_NUMBERS),
    Bad("too-short", "sum-sign", pq_bad([0.1, 0.2]), "sequence length 2, expected 6"),
    Bad("too-long", "sum-sign", pq_bad(ROW6_L + [0.7]), "sequence length 7, expected 6"),
    Bad("empty-sequence", "sum-sign", pq_bad([]), "sequence length 0, expected 6"),
    Bad("below-min-seq-len", "sum-sign", pq_bad([0.1, 0.2]), "sequence length 2, expected 3..6",
        ("--min-seq-len", "3")),
    Bad("null-sequence", "sum-sign", pq_bad(None), "missing 'sequence'"),
    Bad("null-label", "sum-sign", pq_bad(ROW6_L, None), "missing 'label'"),
    Bad("label-3-binary", "sum-sign", pq_bad(ROW6_L, 3.0), "'label' must be 0 or 1 for --task sum-sign"),
    Bad("int-label-3-binary", "sum-sign", pq_bad(ROW6_L, 3), "'label' must be 0 or 1", label_type=pa.int64()),
    Bad("int8-label-minus-1", "sum-sign", pq_bad(ROW6_L, -1), "'label' must be 0 or 1", label_type=pa.int8()),
    Bad("label-half-binary", "sum-sign", pq_bad(ROW6_L, 0.5), "'label' must be 0 or 1"),
    Bad("label-NaN", "sum-sign", pq_bad(ROW6_L, float("nan")), "'label' is not a number"),
    Bad("label-inf", "sum-sign", pq_bad(ROW6_L, float("inf")), "'label' is not a number"),
    Bad("class-1.5", "fi-classes", pq_bad(ROW6_L, 1.5), "'label' must be a class in 0..2"),
    Bad("class-3", "fi-classes", pq_bad(ROW6_L, 3.0), "'label' must be a class in 0..2"),
    Bad("class-minus-1", "fi-classes", pq_bad(ROW6_L, -1.0), "'label' must be a class in 0..2"),
    Bad("int-class-3", "fi-classes", pq_bad(ROW6_L, 3), "'label' must be a class in 0..2", label_type=pa.int64()),
    Bad("adding-steps-of-3", "adding", pq_bad([s + [1.0] for s in STEPS_L], 0.5),
        "each step of 'sequence' must hold 2 numbers"),
    Bad("adding-one-step-of-3", "adding", pq_bad([STEPS_L[0] + [1.0]] + STEPS_L[1:], 0.5), "'sequence'"),
    Bad("adding-one-empty-step", "adding", pq_bad([[]] + STEPS_L[1:], 0.5), "'sequence'"),
    Bad("adding-null-step", "adding", pq_bad([None] + STEPS_L[1:], 0.5), "'sequence'"),
    Bad("adding-null-value", "adding", pq_bad([[0.1, None]] + STEPS_L[1:], 0.5), NOT_NUMBERS),
    Bad("adding-inf-value", "adding", pq_bad([[0.1, float("inf")]] + STEPS_L[1:], 0.5), NON_FINITE),
    Bad("adding-label-float32-overflow", "adding", pq_bad(STEPS_L, 1e39), "'label'"),
]


@pytest.mark.parametrize("case", BAD_PARQUET, ids=[c.id for c in BAD_PARQUET])
def test_bad_parquet_row_deep_in_a_file(case, parquet_bases, small_chunks, classes_task, tmp_path, capsys):
    base = parquet_bases[case.task]
    if case.label_type is not None:
        base = base.set_column(1, "label", pc.cast(base.column("label"), case.label_type))
    seq, label = case.bad
    bad = pa.table({"sequence": pa.array([seq], type=base.schema.field("sequence").type),
                    "label": pa.array([label], type=base.schema.field("label").type)})
    table = pa.concat_tables([base.slice(0, PQ_DEEP), bad, base.slice(PQ_DEEP + 1)])
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=PQ_ROW_GROUP)
    assert pq.ParquetFile(path).metadata.num_row_groups == 5
    proc = cli(train_args([path], tmp_path, *ONE_STEP, *case.extra, task=case.task), capsys)
    assert_one_line_error(proc, tmp_path, f"{path}: row {PQ_DEEP} (from 0)", case.message)
    assert not cache_files(tmp_path / "cache", "*.arrow")


WHOLE_COLUMN = [  # a column of the wrong type: every row is bad, the first one is named
    ("string-sequence-column", "sum-sign", pa.array(["0.1,0.2"] * 50), pa.array([1] * 50), NOT_NUMBERS),
    ("list-of-strings-column", "sum-sign", pa.array([["a"] * T] * 50), pa.array([1] * 50), NOT_NUMBERS),
    ("string-label-column", "sum-sign", pa.array([ROW6_L] * 50), pa.array(["1"] * 50), "'label' is not a number ('1')"),
    ("bool-label-column", "sum-sign", pa.array([ROW6_L] * 50), pa.array([True] * 50), "'label' is not a number (True)"),
    ("adding-flat-sequence-column", "adding", pa.array([ROW6_L] * 50), pa.array([0.5] * 50),
     "each step of 'sequence' must hold 2 numbers"),
]


@pytest.mark.parametrize("name,task,sequence,label,message", WHOLE_COLUMN, ids=[c[0] for c in WHOLE_COLUMN])
def test_parquet_column_of_the_wrong_type(name, task, sequence, label, message, tmp_path, capsys):
    good = write_parquet(tmp_path / "a.parquet", *make_rows(40, 1, features=TASK_OF[task].num_features(None)),
                         features=TASK_OF[task].num_features(None), label_type=pa.float64())
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"sequence": sequence, "label": label}), path)
    proc = cli(train_args([good, path], tmp_path, task=task), capsys)
    assert_one_line_error(proc, tmp_path, f"{path}: row 0 (from 0)", message)


def test_bad_row_in_a_second_file_is_numbered_within_that_file(tmp_path, capsys):
    first = write_jsonl(tmp_path / "a.jsonl", *make_rows(300, 1))
    second = write_jsonl(tmp_path / "b.jsonl", *make_rows(40, 2))
    with open(second, "a") as handle:
        handle.write('{"sequence":%s,"label":7}\n' % ROW6)
    proc = cli(train_args([first, second], tmp_path), capsys)
    err = assert_one_line_error(proc, tmp_path, f"{second}: row 40 (from 0)", "'label' must be 0 or 1")
    assert str(first) not in err


def write_empty_parquet(path: Path) -> Path:
    pq.write_table(pa.table({"sequence": pa.array([], type=pa.list_(pa.float64())), "label": pa.array([], pa.int64())}),
                   path)
    return path


def file_level_cases(tmp: Path):
    """(id, --data-files value, fragments the one line must hold)."""
    good_js = write_jsonl(tmp / "good.jsonl", *make_rows(20, 1))
    good_pq = write_parquet(tmp / "good.parquet", *make_rows(20, 1))
    empty_pq = write_empty_parquet(tmp / "empty.parquet")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.jsonl").write_text("\n   \n\t\n\n")
    (tmp / "noseq.jsonl").write_text('{"values":[0.1],"label":1}\n')
    pq.write_table(pa.table({"values": pa.array([ROW6_L] * 3), "label": pa.array([1] * 3)}), tmp / "noseq.parquet")
    (tmp / "garbage.parquet").write_bytes(b"PAR1 not really parquet " * 10)
    data = (tmp / "good.parquet").read_bytes()
    (tmp / "cut.parquet").write_bytes(data[:len(data) // 2])
    (tmp / "firstbad.jsonl").write_text("{oops\n" + jsonl_line(np.zeros((T, 1)), 1) + "\n")
    (tmp / "array.jsonl").write_text("[1,2,3]\n")
    (tmp / "data.csv").write_text("sequence,label\n")
    (tmp / "sub").mkdir()
    os.symlink(good_js, tmp / "sub" / "link.jsonl")
    return [
        ("empty-parquet", f"{empty_pq}", [f"{empty_pq} has no rows", "--data-files"]),
        ("empty-jsonl", f"{tmp / 'empty.jsonl'}", [f"{tmp / 'empty.jsonl'} has no rows"]),
        ("blank-lines-jsonl", f"{tmp / 'blank.jsonl'}", [f"{tmp / 'blank.jsonl'} has no rows"]),
        ("empty-second-file", f"{good_pq},{empty_pq}", [f"{empty_pq} has no rows"]),
        ("glob-matches-nothing", f"{tmp}/nothing-*.jsonl", ["--data-files", "no such file", "nothing-*.jsonl"]),
        ("missing-file", f"{good_js},{tmp / 'gone.jsonl'}", ["--data-files", "no such file", "gone.jsonl"]),
        ("listed-twice", f"{good_js},{good_js}", ["--data-files", "listed twice"]),
        ("listed-twice-by-glob", f"{good_js},{tmp}/good.js*", ["--data-files", "listed twice"]),
        ("listed-twice-via-symlink", f"{good_js},{tmp / 'sub' / 'link.jsonl'}", ["--data-files", "listed twice"]),
        ("jsonl-and-parquet", f"{good_js},{good_pq}", ["--data-files", ".jsonl", ".parquet"]),
        ("csv", f"{tmp / 'data.csv'}", ["--data-files", ".csv"]),
        ("jsonl-second-file-lacks-sequence", f"{good_js},{tmp / 'noseq.jsonl'}",
         ["--sequence-column", "'sequence'", f"{tmp / 'noseq.jsonl'}"]),
        ("parquet-second-file-lacks-sequence", f"{good_pq},{tmp / 'noseq.parquet'}",
         ["--sequence-column", "'sequence'", f"{tmp / 'noseq.parquet'}"]),
        ("not-parquet", f"{tmp / 'garbage.parquet'}",
         ["--data-files", f"{tmp / 'garbage.parquet'}", "not a readable parquet"]),
        ("truncated-parquet", f"{tmp / 'cut.parquet'}",
         ["--data-files", f"{tmp / 'cut.parquet'}", "not a readable parquet"]),
        ("first-line-not-json", f"{tmp / 'firstbad.jsonl'}",
         [f"{tmp / 'firstbad.jsonl'}: row 0 (from 0)", "not valid JSON"]),
        ("first-line-not-object", f"{tmp / 'array.jsonl'}",
         [f"{tmp / 'array.jsonl'}: row 0 (from 0)", "not a JSON object"]),
    ]


FILE_LEVEL_IDS = [
    "empty-parquet", "empty-jsonl", "blank-lines-jsonl", "empty-second-file", "glob-matches-nothing", "missing-file",
    "listed-twice", "listed-twice-by-glob", "listed-twice-via-symlink", "jsonl-and-parquet", "csv",
    "jsonl-second-file-lacks-sequence", "parquet-second-file-lacks-sequence", "not-parquet", "truncated-parquet",
    "first-line-not-json", "first-line-not-object"]


@pytest.mark.parametrize("case_id", FILE_LEVEL_IDS)
def test_bad_files(case_id, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    cases = {c[0]: c for c in file_level_cases(data)}
    assert set(cases) == set(FILE_LEVEL_IDS)
    _, files, fragments = cases[case_id]
    proc = cli(train_args([files], tmp_path), capsys)
    assert_one_line_error(proc, tmp_path, *fragments)


@pytest.mark.parametrize("how", ["under-a-regular-file", "is-a-regular-file"])
def test_unusable_data_cache_is_one_line_naming_the_option(how, tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", *make_rows(30, 1))
    (tmp_path / "plain").write_text("a file, not a directory\n")
    cache = tmp_path / "plain" / "cache" if how == "under-a-regular-file" else tmp_path / "plain"
    args = train_args([path], tmp_path)
    args[args.index("--data-cache") + 1] = str(cache)
    proc = cli(args, capsys)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, (proc.returncode, proc.stderr)
    assert "--data-cache" in err and str(tmp_path / "plain") in err
    assert not (tmp_path / "run").exists()


def test_fixed_bad_row_then_trains(tmp_path, capsys):
    """A failed build leaves nothing behind that stops the next run once the row is fixed."""
    seqs, labels = make_rows(100, 3)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    good = path.read_text()
    path.write_text(good + '{"sequence":%s,"label":2}\n' % ROW6)
    assert_one_line_error(cli(train_args([path], tmp_path), capsys), tmp_path, f"{path}: row 100 (from 0)")
    path.write_text(good)
    proc = cli(train_args([path], tmp_path, "--max-steps", "2"), capsys)
    assert proc.returncode == 0, proc.stderr
    assert "100 rows in 1 file(s)" in proc.stdout
    assert len(cache_files(tmp_path / "cache", "*.arrow")) == 1 and not cache_files(tmp_path / "cache", ".tmp-*")


# --- 2. exactness of the index ------------------------------------------------------------------
@pytest.fixture
def tiny_chunks(monkeypatch):
    """About 37 rows per record batch and 4 KiB JSON blocks."""
    monkeypatch.setattr(fi, "CHUNK_BYTES", 37 * (4 * T + 12))
    monkeypatch.setattr(fi, "JSON_BLOCK_BYTES", 4 << 10)


def check_rows(index, seqs, labels, features, variable, label_dtype=np.float32):
    x, y, lengths = expected(seqs, labels, features, label_dtype)
    batch = read_all(index, variable)
    assert index.rows == len(seqs)
    assert batch["x"].dtype == torch.float32 and batch["x"].shape == (len(seqs), T, features)
    np.testing.assert_array_equal(batch["x"].numpy(), x)  # values, and zeros past each length
    np.testing.assert_array_equal(batch["y"].numpy(), y)
    assert batch["y"].dtype == torch.from_numpy(y).dtype
    if variable:
        np.testing.assert_array_equal(batch["lengths"].numpy(), lengths)
    else:
        assert "lengths" not in batch
    # gathered in a random order, with repeats, across every chunk
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, len(seqs), 3 * len(seqs)))
    got = index.take(ids)
    np.testing.assert_array_equal(got["x"].numpy(), x[ids.numpy()])
    np.testing.assert_array_equal(got["y"].numpy(), y[ids.numpy()])
    np.testing.assert_array_equal(got["lengths"].numpy(), lengths[ids.numpy()])
    reverse = index.take(torch.arange(len(seqs) - 1, -1, -1))
    np.testing.assert_array_equal(reverse["x"].numpy(), x[::-1])
    empty = index.take(torch.zeros(0, dtype=torch.int64))
    assert empty["x"].shape == (0, T, features) and empty["y"].shape == (0,)


SHAPES = [(1, T), (1, 2), (2, T), (2, 2)]  # (features, min length): fixed and variable, one and two features


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
@pytest.mark.parametrize("features,min_len", SHAPES, ids=[f"F{f}-min{m}" for f, m in SHAPES])
def test_rows_read_back_exactly(fmt, features, min_len, tiny_chunks, tmp_path):
    task = SUM_SIGN if features == 1 else ADDING
    seqs, labels = make_rows(1000, 21, features=features, min_len=min_len,
                             label_kind="int" if features == 1 else "float")
    if fmt == "parquet":
        path = write_parquet(tmp_path / "a.parquet", seqs, labels, features, row_group_size=100,
                             label_type=pa.int64() if features == 1 else pa.float64())
    else:
        path = write_jsonl(tmp_path / "a.jsonl", seqs, labels, features)
    index = index_of([path], tmp_path / "cache", task, TaskSpec(T, min_len))
    assert arrow_batches(index) >= 10  # the file spans many record batches
    check_rows(index, seqs, labels, features, min_len < T)


def test_several_parquet_files_of_mixed_types_in_the_given_order(tiny_chunks, tmp_path):
    parts = [make_rows(n, seed, min_len=1) for n, seed in ((130, 1), (1, 2), (77, 3), (45, 4), (90, 5))]
    parts[2] = ([np.round(v * 10) for v in parts[2][0]], parts[2][1])  # integers, for the int64 column
    writers = [
        lambda p, s, y: write_parquet(p, s, y, row_group_size=50),
        lambda p, s, y: write_parquet(p, s, y, label_type=pa.float32()),
        lambda p, s, y: write_parquet(p, s, y, seq_type=pa.list_(pa.int64()), label_type=pa.uint8()),
        lambda p, s, y: write_parquet(p, s, y, seq_type=pa.large_list(pa.float32()), label_type=pa.int8()),
        lambda p, s, y: pq.write_table(pa.table({  # F=1 as a list of 1-number lists
            "sequence": pa.array([v.tolist() for v in s], type=pa.list_(pa.list_(pa.float64()))),
            "label": pa.array(y.tolist(), type=pa.int32())}), p) or p,
    ]
    paths = []
    for name, (seqs, labels), write in zip("edcab", parts, writers):
        paths.append(write(tmp_path / f"{name}.parquet", seqs, labels))
    index = index_of(paths, tmp_path / "cache", SUM_SIGN, TaskSpec(T, 1))
    assert [f.path for f in index.files] == [str(p) for p in paths]  # not sorted: the order given
    assert [f.rows for f in index.files] == [130, 1, 77, 45, 90]
    all_seqs = [s for seqs, _ in parts for s in seqs]
    all_labels = np.concatenate([labels for _, labels in parts])
    check_rows(index, all_seqs, all_labels, 1, True)


def test_several_jsonl_files_with_awkward_lines(tiny_chunks, tmp_path):
    parts = [make_rows(n, seed, min_len=1) for n, seed in ((200, 1), (1, 2), (60, 3))]
    parts[2] = ([np.round(v * 1e4) if i % 2 else v for i, v in enumerate(parts[2][0])], parts[2][1])
    a = write_jsonl(tmp_path / "z.jsonl", *parts[0], newline="\r\n")  # CRLF
    lines = [jsonl_line(s, y) for s, y in zip(*parts[1])]
    b = tmp_path / "y.json"
    b.write_text("\n\n" + "\n".join(lines))  # leading blank lines, no final newline, .json suffix
    c = tmp_path / "x.jsonl"
    with open(c, "w") as handle:  # extra fields, integer values, blank lines between rows
        for i, (s, y) in enumerate(zip(*parts[2])):
            values = [int(v) if i % 2 else float(v) for v in s[:, 0]]  # JSON integers in odd rows
            row = {"id": i, "note": "x" * (i % 7), "label": int(y), "sequence": values}
            handle.write(json.dumps(row) + ("\n \n" if i % 5 == 0 else "\n"))
    index = index_of([a, b, c], tmp_path / "cache", SUM_SIGN, TaskSpec(T, 1))
    assert [f.rows for f in index.files] == [200, 1, 60]
    check_rows(index, [s for seqs, _ in parts for s in seqs], np.concatenate([y for _, y in parts]), 1, True)


def test_jsonl_rows_longer_than_a_json_block(monkeypatch, tmp_path):
    """A row longer than two of pyarrow's JSON blocks is a valid row (at 16 MiB blocks: e.g. 300,000
    steps of 8 features, 48 MB of JSON); blocks of 4 KiB and a 9 KB row here."""
    monkeypatch.setattr(fi, "JSON_BLOCK_BYTES", 4 << 10)
    rng = np.random.default_rng(3)
    seqs, labels = [rng.standard_normal((T, 1)) for _ in range(30)], rng.integers(0, 2, 30)
    seqs[17] = rng.standard_normal((T, 1)) * 1e-7
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"sequence": s[:, 0].tolist(), "label": int(y),
                                        "note": "x" * (9000 if i == 17 else 10)}) + "\n"
                            for i, (s, y) in enumerate(zip(seqs, labels))))
    check_rows(index_of([path], tmp_path / "cache"), seqs, labels, 1, False)


def test_jsonl_steps_of_one_number_for_one_feature(tmp_path):
    """A list of 1-number lists is a sequence of one feature: parquet takes it, so must JSON lines."""
    seqs, labels = make_rows(40, 2)
    pq_path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"sequence": pa.array([s.tolist() for s in seqs], type=pa.list_(pa.list_(pa.float64()))),
                             "label": pa.array(labels)}), pq_path)
    check_rows(index_of([pq_path], tmp_path / "cache"), seqs, labels, 1, False)
    js_path = tmp_path / "a.jsonl"
    js_path.write_text("".join(json.dumps({"sequence": s.tolist(), "label": int(y)}) + "\n"
                               for s, y in zip(seqs, labels)))
    check_rows(index_of([js_path], tmp_path / "cache"), seqs, labels, 1, False)


def test_extreme_but_finite_values_are_kept(tmp_path):
    big = float(np.finfo(np.float32).max)
    rows = [[big, -big, 1e-45, -0.0, 16777217, 3], [1e-38, 2 ** 60, -2 ** 60, 0.1, 1e30, -1e-30]]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"sequence": r, "label": i}) + "\n" for i, r in enumerate(rows)))
    batch = read_all(index_of([path], tmp_path / "cache"), False)
    np.testing.assert_array_equal(batch["x"][:, :, 0].numpy(), np.array(rows, dtype=np.float64).astype(np.float32))
    assert torch.isfinite(batch["x"]).all()


def test_classes_labels_are_int64(tmp_path):
    seqs, labels = make_rows(200, 4, classes=3)
    labels = labels.astype(np.float64)  # 2.0 is class 2
    for fmt in ("jsonl", "parquet"):
        path = (write_jsonl(tmp_path / "a.jsonl", seqs, labels) if fmt == "jsonl" else
                write_parquet(tmp_path / "a.parquet", seqs, labels, label_type=pa.float64()))
        index = index_of([path], tmp_path / "cache", CLASSES)
        check_rows(index, seqs, labels.astype(np.int64), 1, False, label_dtype=np.int64)
        assert set(read_all(index, False)["y"].tolist()) == {0, 1, 2}


def test_resolve_files_keeps_the_order_given_and_sorts_each_glob(tmp_path):
    for name in ("b.jsonl", "a2.jsonl", "a1.jsonl", "c.jsonl"):
        (tmp_path / name).write_text("{}\n")
    got = resolve_files(f"{tmp_path}/c.jsonl, {tmp_path}/a*.jsonl ,{tmp_path}/b.jsonl")
    assert got == [str(tmp_path / n) for n in ("c.jsonl", "a1.jsonl", "a2.jsonl", "b.jsonl")]


def test_index_and_source_pickle_for_loader_workers(tmp_path):
    seqs, labels = make_rows(120, 6, min_len=2)
    index = index_of([write_jsonl(tmp_path / "a.jsonl", seqs, labels)], tmp_path / "cache", spec=TaskSpec(T, 2))
    source = FileSource(index, 3, True)
    positions = torch.arange(100, 260)
    want = source.samples(positions)
    copy = pickle.loads(pickle.dumps(source))
    got = copy.samples(positions)
    for key in ("x", "y", "lengths", "index"):
        assert torch.equal(got[key], want[key]), key


# --- 3. shuffle ---------------------------------------------------------------------------------
N_ROWS = 211


@pytest.fixture
def numbered(tmp_path):
    """A file whose row i holds i at every step: x names the row."""
    path = tmp_path / "n.parquet"
    write_parquet(path, [np.full((T, 1), float(i)) for i in range(N_ROWS)], [i % 2 for i in range(N_ROWS)],
                  row_group_size=50)
    return path


def epoch_rows(source, epoch):
    return source.row_ids(torch.arange(epoch * N_ROWS, (epoch + 1) * N_ROWS))


def test_each_epoch_is_a_permutation_of_all_rows(numbered, tiny_chunks, tmp_path):
    index = index_of([numbered], tmp_path / "cache")
    source = FileSource(index, 7, False)
    epochs = [epoch_rows(source, e) for e in range(6)]
    for rows in epochs:
        assert sorted(rows.tolist()) == list(range(N_ROWS))  # each row exactly once
        assert not torch.equal(rows, torch.arange(N_ROWS))
    assert len({tuple(r.tolist()) for r in epochs}) == 6  # reshuffled every epoch
    assert (epochs[0] != epochs[1]).sum() > N_ROWS // 2  # not a small variation of the last epoch
    # the samples are those rows
    batch = source.samples(torch.arange(2 * N_ROWS, 3 * N_ROWS))
    assert batch["x"][:, :, 0].eq(epochs[2][:, None].float()).all()
    assert batch["y"].tolist() == [float(r % 2) for r in epochs[2].tolist()]
    assert batch["index"].tolist() == list(range(2 * N_ROWS, 3 * N_ROWS)) and "lengths" not in batch
    # another seed, another order; the same seed rebuilt from scratch (a new index too), the same order
    other = FileSource(index, 8, False)
    assert all(not torch.equal(epoch_rows(other, e), epochs[e]) for e in range(6))
    again = FileSource(index_of([numbered], tmp_path / "cache"), 7, False)
    assert all(torch.equal(epoch_rows(again, e), epochs[e]) for e in range(6))
    # evaluation order: seed None keeps the files' order, cycled
    assert FileSource(index, None, False).row_ids(torch.arange(N_ROWS - 3, N_ROWS + 3)).tolist() == \
        [N_ROWS - 3, N_ROWS - 2, N_ROWS - 1, 0, 1, 2]


def test_positions_straddling_epochs(numbered, tmp_path):
    source = FileSource(index_of([numbered], tmp_path / "cache"), 11, False)
    e0, e1, e2 = (epoch_rows(source, e) for e in range(3))
    straddle = source.row_ids(torch.arange(N_ROWS - 5, 2 * N_ROWS + 4))
    assert torch.equal(straddle, torch.cat([e0[-5:], e1, e2[:4]]))
    # any order of positions, and any split into runs, gives the same rows
    shuffled = torch.randperm(3 * N_ROWS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(source.row_ids(shuffled), torch.cat([e0, e1, e2])[shuffled])
    runs = source.runs([(N_ROWS - 5, N_ROWS + 2), (2 * N_ROWS + 1, 2 * N_ROWS + 4)])
    assert runs["x"][:, 0, 0].tolist() == [float(r) for r in torch.cat([e0[-5:], e1[:2], e2[1:4]]).tolist()]
    # a fresh source asked for a late epoch first agrees (no state carried between calls)
    fresh = FileSource(index_of([numbered], tmp_path / "cache"), 11, False)
    assert torch.equal(fresh.row_ids(torch.arange(2 * N_ROWS, 3 * N_ROWS)), e2)


def permutation(n, seed):
    return Permutation(n, tuple(derive_seed(seed, 99, r) for r in range(Permutation.ROUNDS)))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 1000, 4096, 4097, 65_537])
def test_permutation_is_a_bijection(n):
    for seed in range(2 if n > 5000 else 10):
        image = permutation(n, seed)(torch.arange(n))
        assert image.dtype == torch.int64 and image.min() >= 0 and image.max() < n
        assert torch.equal(torch.sort(image).values, torch.arange(n)), (n, seed)
        # any position alone maps as it does among the others
        picks = torch.tensor([0, n - 1, n // 2])
        assert torch.equal(permutation(n, seed)(picks), image[picks])


def test_permutation_rejects_bad_arguments():
    with pytest.raises(ValueError):
        Permutation(0, (1,) * Permutation.ROUNDS)
    with pytest.raises(ValueError):
        Permutation(5, (1, 2))


@pytest.mark.parametrize("n,seeds", [(2, 400), (5, 400), (17, 400)])
def test_permutation_is_roughly_uniform(n, seeds):
    """Over many seeds every item lands at every position about equally often (a chi-square bound),
    and neighbouring positions do not stay neighbours."""
    counts = np.zeros((n, n))
    positions = torch.arange(n)
    adjacent = 0
    for seed in range(seeds):
        image = permutation(n, seed)(positions).numpy()
        counts[positions.numpy(), image] += 1
        adjacent += abs(int(image[0]) - int(image[1])) == 1
    want = seeds / n
    chi2 = ((counts - want) ** 2 / want).sum()
    df = (n - 1) ** 2
    assert chi2 < df + 6 * (2 * df) ** 0.5 + 5, (chi2, df, counts)
    if n >= 17:  # a uniform permutation puts them side by side with probability 2/n
        assert adjacent < seeds * 4 / n, adjacent


# --- 4. the cache -------------------------------------------------------------------------------
def entry_state(index):
    stat = os.stat(index.files[0].arrow)
    return index.files[0].arrow, stat.st_ino, stat.st_mtime_ns


def test_second_open_reuses_the_entry(tmp_path):
    seqs, labels = make_rows(300, 1)
    path = write_parquet(tmp_path / "a.parquet", seqs, labels)
    first_said, second_said = [], []
    first = index_of([path], tmp_path / "cache", said=first_said)
    assert any("indexing 1 of 1 data file(s)" in line for line in first_said)
    record = json.loads(cache_files(tmp_path / "cache", "*.json")[0].read_text())
    assert record["rows"] == 300 and record["path"] == str(path) and record["size"] == path.stat().st_size
    time.sleep(0.01)
    second = index_of([path], tmp_path / "cache", said=second_said)
    assert second_said == []  # nothing indexed, nothing said
    assert entry_state(second) == entry_state(first)
    assert json.loads(cache_files(tmp_path / "cache", "*.json")[0].read_text()) == record
    check_rows(second, seqs, labels, 1, False)


@pytest.mark.parametrize("change", ["content-and-size", "same-size"])
def test_a_modified_file_is_indexed_again(change, tmp_path):
    seqs, labels = make_rows(200, 1)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    old = index_of([path], tmp_path / "cache")
    old_arrow = old.files[0].arrow
    if change == "same-size":  # one label flipped: the same bytes count, another modification time
        lines = path.read_text().splitlines()
        lines[150] = lines[150].replace('"label":0', '"label":1') if '"label":0' in lines[150] else \
            lines[150].replace('"label":1', '"label":0')
        labels = labels.copy()
        labels[150] = 1 - labels[150]
        size = path.stat().st_size
        path.write_text("\n".join(lines) + "\n")
        assert path.stat().st_size == size
    else:
        seqs, labels = make_rows(230, 2)
        write_jsonl(path, seqs, labels)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))  # even a coarse clock sees it
    said = []
    new = index_of([path], tmp_path / "cache", said=said)
    notices = [line for line in said if str(path) in line]
    assert len(notices) == 1, said
    assert ("changed size" if change == "content-and-size" else "was modified") in notices[0]
    assert "indexing it again" in notices[0]
    check_rows(new, seqs, labels, 1, False)
    assert not os.path.exists(old_arrow)  # the stale index is removed
    assert [str(p) for p in cache_files(tmp_path / "cache", "*.arrow")] == [new.files[0].arrow]
    assert old.changed() is not None and new.changed() is None
    assert old.identity() != new.identity()


def test_each_row_shape_has_its_own_entry(tmp_path):
    seqs, labels = make_rows(150, 1, min_len=2)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    cache = tmp_path / "cache"
    six = index_of([path], cache, spec=TaskSpec(T, 2))
    eight = index_of([path], cache, spec=TaskSpec(8, 2))
    assert six.files[0].arrow != eight.files[0].arrow
    assert len(cache_files(cache, "*.arrow")) == 2 and len(cache_files(cache, "*.json")) == 2
    batch = read_all(eight, True)
    assert batch["x"].shape == (150, 8, 1) and batch["x"][:, T:].abs().sum() == 0
    said = []
    again = [index_of([path], cache, spec=spec, said=said) for spec in (TaskSpec(T, 2), TaskSpec(8, 2))]
    assert said == [] and [a.files[0].arrow for a in again] == [six.files[0].arrow, eight.files[0].arrow]
    assert six.identity() == eight.identity()  # the same content


def test_lost_or_corrupt_record_is_rebuilt(tmp_path):
    seqs, labels = make_rows(80, 1)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    first = index_of([path], tmp_path / "cache")
    os.unlink(first.files[0].arrow)  # the record points at an index that is gone
    said = []
    check_rows(index_of([path], tmp_path / "cache", said=said), seqs, labels, 1, False)
    assert sum(str(path) in line and "lost its index" in line for line in said) == 1, said
    cache_files(tmp_path / "cache", "*.json")[0].write_text("{not json")
    check_rows(index_of([path], tmp_path / "cache"), seqs, labels, 1, False)
    assert len(cache_files(tmp_path / "cache", "*.arrow")) == 1


def index_in_a_child(path, cache, out, ready, expect):
    """A forked process: wait until ``expect`` processes are ready, open the index, write what it read."""
    Path(ready, str(os.getpid())).touch()
    deadline = time.time() + 60
    while len(os.listdir(ready)) < expect and time.time() < deadline:
        time.sleep(0.002)
    said = []
    index = index_of([path], cache, said=said)
    batch = index.take(torch.arange(index.rows))
    Path(out).write_text(json.dumps({"x": batch["x"].numpy().ravel().tolist(), "y": batch["y"].numpy().tolist(),
                                     "said": said, "arrow": index.files[0].arrow, "pid": os.getpid()}))


def test_processes_indexing_at_once_build_once(tmp_path, monkeypatch):
    """Three processes find a file not indexed at once: one builds it, the others wait for its lock, then
    say which process built the index they use instead of having indexed it."""
    import multiprocessing

    seqs, labels = make_rows(500, 1)
    path = write_parquet(tmp_path / "a.parquet", seqs, labels)
    log, ready, cache = tmp_path / "builds.log", tmp_path / "ready", tmp_path / "cache"
    ready.mkdir()
    real = fi._build

    def slow_build(*args, **kwargs):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # hold the entry's lock while the others wait for it
        return real(*args, **kwargs)

    monkeypatch.setattr(fi, "_build", slow_build)  # the forked children inherit it
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=index_in_a_child, args=(path, cache, tmp_path / f"out{i}.json", ready, 3))
                for i in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(3)]
    assert all(any("indexing 1 of 1" in line for line in o["said"]) for o in outs)  # all found it missing
    (builder,) = log.read_text().split()  # one built it; the others waited for the lock and used it
    built, waited = [o for o in outs if o["pid"] == int(builder)], [o for o in outs if o["pid"] != int(builder)]
    assert len(built) == 1 and len(waited) == 2
    assert built[0]["said"][-1].startswith("distseq: indexed 500 rows of 1 file(s) in ")
    for out in waited:
        assert out["said"][1:] == [f"distseq: {path} was indexed by pid {builder} on {socket.gethostname()} while "
                                   f"this process waited for it: using that index"]
    x, y, _ = expected(seqs, labels)
    for out in outs:
        assert out["x"] == x.ravel().tolist() and out["y"] == y.tolist() and out["arrow"] == outs[0]["arrow"]
    assert len(cache_files(cache, "*.arrow")) == 1 and len(cache_files(cache, "*.json")) == 1
    assert not cache_files(cache, ".tmp-*")


def corrupt_cases():
    def truncate_half(arrow):
        os.truncate(arrow, os.path.getsize(arrow) // 2)

    def empty(arrow):
        os.truncate(arrow, 0)

    def garbage(arrow):
        Path(arrow).write_bytes(b"\x00garbage" * 64)

    def drop_last_batch(arrow):  # a whole record batch lost: every message intact, rows missing
        reader = pa.ipc.open_stream(pa.memory_map(arrow))
        batches = list(reader)
        assert len(batches) > 1
        with pa.OSFile(arrow + ".x", "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as writer:
            for batch in batches[:-1]:
                writer.write_batch(batch)
        os.replace(arrow + ".x", arrow)

    return {"truncated": truncate_half, "empty": empty, "garbage": garbage, "batch-lost": drop_last_batch}


@pytest.mark.parametrize("how", list(corrupt_cases()))
def test_a_corrupt_index_is_rebuilt_with_one_line(how, tiny_chunks, tmp_path, capsys):
    """A damaged index (its data file unchanged) is found before the run starts and built again, with one
    line of notice; the run then trains on the right rows, and a later run reuses the new index."""
    seqs, labels = make_rows(300, 1)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    arrow = index_of([path], tmp_path / "cache").files[0].arrow
    corrupt_cases()[how](arrow)
    proc = cli(train_args([path], tmp_path, "--global-batch-size", "300", "--max-steps", "2"), capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"distseq: {path} has a damaged index: indexing it again" in proc.stdout
    rebuilt = index_of([path], tmp_path / "cache")
    check_rows(rebuilt, seqs, labels, 1, False)
    again = cli(train_args([path], tmp_path, "--global-batch-size", "300", "--max-steps", "2", run="again"), capsys)
    assert again.returncode == 0 and "distseq: index" not in again.stdout


def row_spans(arrow: str, row: int) -> dict:
    """``{column: (offset in the file, bytes)}`` of row ``row`` of an index file, over its record batches."""
    mapped = pa.memory_map(arrow)
    base = mapped.read_buffer(1).address  # byte 0 of the map
    mapped.seek(0)
    for batch in pa.ipc.open_stream(mapped):
        if row < batch.num_rows:
            break
        row -= batch.num_rows
    spans = {}
    for name in batch.schema.names:
        column = batch.column(name)
        values, width = (column.values, column.type.list_size) if name == "x" else (column, 1)
        item = values.type.bit_width // 8
        spans[name] = (values.buffers()[1].address - base + (values.offset + row * width) * item, width * item)
    return spans


def overwrite(arrow: str, offset: int, data: bytes) -> None:
    """Bytes of the index file overwritten in place: the same size, the same inode."""
    size = os.path.getsize(arrow)
    with open(arrow, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)
    assert os.path.getsize(arrow) == size


def damage(how: str, arrow: str, row: int) -> None:
    """``value``: one value of ``row``'s sequence overwritten; ``copied-row``: row - 1 copied over ``row``
    whole (its sequence, label, length and checksum), each value a valid one."""
    spans = row_spans(arrow, row)
    if how == "value":
        overwrite(arrow, spans["x"][0] + 8, np.float32(99.5).tobytes())
        return
    data = Path(arrow).read_bytes()
    for (source, size), (target, _) in zip(row_spans(arrow, row - 1).values(), spans.values()):
        overwrite(arrow, target, data[source:source + size])


def recording_samples(monkeypatch) -> list:
    """(row ids, x) of every batch the stream reads, in order: the rows a run trains on."""
    real, seen = FileSource.samples, []

    def samples(self, positions):
        batch = real(self, positions)
        seen.append((self.row_ids(positions), batch["x"].clone()))
        return batch

    monkeypatch.setattr(FileSource, "samples", samples)
    return seen


@pytest.mark.parametrize("how", ["value", "copied-row"])
def test_bytes_overwritten_inside_an_index_are_found_before_use_and_it_is_rebuilt(how, tmp_path, capsys,
                                                                                  monkeypatch):
    """An index whose bytes were overwritten (the same size; its data file intact) is found at the start of
    the next run, before any of its rows is read, and built again with one line: the run trains on the
    file's rows."""
    seqs, labels = make_rows(300, 1)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    arrow = index_of([path], tmp_path / "cache").files[0].arrow
    damage(how, arrow, 123)
    trained = recording_samples(monkeypatch)
    proc = cli(train_args([path], tmp_path, "--global-batch-size", "300", "--max-steps", "2"), capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"distseq: {path} has a damaged index: indexing it again" in proc.stdout
    x, _, _ = expected(seqs, labels)
    assert trained and all(np.array_equal(batch_x.numpy(), x[ids.numpy()]) for ids, batch_x in trained)
    said = []
    check_rows(index_of([path], tmp_path / "cache", said=said), seqs, labels, 1, False)
    assert said == []


def test_an_index_is_read_once_per_process(tmp_path, monkeypatch):
    """Checking an index costs one read of it per process (and none in the process that built it), then a
    stat per look: a write to it moves its stat, and it is read again."""
    path = write_jsonl(tmp_path / "a.jsonl", *make_rows(50, 1))
    arrow = index_of([path], tmp_path / "cache").files[0].arrow
    reads, real = [], fi.sha256_file
    monkeypatch.setattr(fi, "sha256_file", lambda name: reads.append(str(name)) or real(name))
    index_of([path], tmp_path / "cache").open()
    assert reads == []  # this process built it: it read it then
    monkeypatch.setattr(fi, "_VERIFIED", {})  # as a new process
    for _ in range(3):
        index_of([path], tmp_path / "cache").open()
    assert reads == [arrow]
    time.sleep(0.02)  # past a tick of the file system's clock
    os.utime(arrow)  # the same bytes, another stat: read again, still intact
    assert index_of([path], tmp_path / "cache").open().rows == 50 and reads == [arrow, arrow]


def test_an_index_damaged_after_the_check_is_refused_when_it_is_opened(tmp_path):
    """Between the start's check and the process mapping the index (or a DataLoader worker opening its
    own): one line naming the index, not a row of it read."""
    path = write_jsonl(tmp_path / "a.jsonl", *make_rows(60, 1))
    index = index_of([path], tmp_path / "cache")
    damage("value", index.files[0].arrow, 10)
    with pytest.raises(fi.DamagedIndex) as refused:
        index.open()
    assert str(refused.value) == (f"{index.files[0].arrow}, the index of {path}, was damaged after this run checked "
                                  f"it; run again: distseq indexes the file again (a run resumes from its last "
                                  f"checkpoint)")
    assert refused.value.every_rank and refused.value.exit_code == 2


def test_an_index_damaged_under_a_running_job_stops_it_without_saving(tmp_path, capsys, monkeypatch):
    """Bytes written into an index a job has mapped (the map shows them) stop it at the next checkpoint,
    which is not written; running again builds the index again."""
    path = write_jsonl(tmp_path / "a.jsonl", *make_rows(100, 1))
    arrow = index_of([path], tmp_path / "cache").files[0].arrow
    real, calls = FileSource.samples, []

    def samples(self, positions):
        calls.append(len(positions))
        if len(calls) == 1:  # while the run trains (this call feeds several steps)
            time.sleep(0.02)  # past a tick of the file system's clock
            damage("value", arrow, 50)
        return real(self, positions)

    monkeypatch.setattr(FileSource, "samples", samples)
    proc = cli(train_args([path], tmp_path, "--checkpoint-every", "3"), capsys)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, (proc.returncode, proc.stdout[-2000:], err)
    assert (f"--data-files: {arrow}, the index of {path}, was damaged while this run trained on it; stopped at step "
            f"3 without saving") in err and err.endswith("run again: distseq indexes the file again and resumes")
    assert not any((tmp_path / "run" / "checkpoints").glob("step-*"))
    monkeypatch.setattr(FileSource, "samples", real)
    again = cli(train_args([path], tmp_path), capsys)
    assert again.returncode == 0 and f"distseq: {path} has a damaged index: indexing it again" in again.stdout


def test_an_index_without_its_sha256_is_built_again(tmp_path):
    """An entry written before indexes had their own sha256 (an older distseq's) is indexed again, once."""
    seqs, labels = make_rows(40, 1)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    index_of([path], tmp_path / "cache")
    (record_path,) = cache_files(tmp_path / "cache", "*.json")
    record_path.write_text(json.dumps({k: v for k, v in json.loads(record_path.read_text()).items()
                                       if k != "index_sha256"}))
    said = []
    check_rows(index_of([path], tmp_path / "cache", said=said), seqs, labels, 1, False)
    assert said[0] == f"distseq: {path} has an index without its sha256 (an older distseq's): indexing it again"
    said.clear()
    index_of([path], tmp_path / "cache", said=said)
    assert said == []


def test_a_bad_file_is_read_once_and_its_error_remembered(tmp_path, monkeypatch):
    """The first process to index a bad file records its error for that version of the file: the job's
    other processes and later runs say the same line without reading it again; a fixed file is indexed."""
    from distseq.errors import DataFileError

    seqs, labels = make_rows(50, 1)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    with open(path, "a") as handle:
        handle.write(json.dumps({"sequence": [0.5] * T, "label": 7}) + "\n")
    with pytest.raises(DataFileError) as first:
        index_of([path], tmp_path / "cache")
    assert f"{path}: row 50 (from 0): 'label' must be 0 or 1" in str(first.value)
    assert not first.value.every_rank  # every process meets it alike: rank 0 prints it

    def no_build(*args, **kwargs):
        raise AssertionError("the file was read again")

    with monkeypatch.context() as patch:
        patch.setattr(fi, "_build", no_build)
        with pytest.raises(DataFileError) as again:
            index_of([path], tmp_path / "cache")
    assert str(again.value) == str(first.value)
    path.write_text(path.read_text().replace('"label": 7', '"label": 1.0'))  # another size: seen as changed
    assert index_of([path], tmp_path / "cache").rows == 51


# --- 5. identity and changes --------------------------------------------------------------------
def test_identity_is_the_content_not_the_path(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    parts = [make_rows(50, 1), make_rows(70, 2)]
    files = [write_parquet(tmp_path / "one" / f"{i}.parquet", *p) for i, p in enumerate(parts)]
    copies = [Path(shutil.copy(f, tmp_path / "two" / f"copy{i}.parquet")) for i, f in enumerate(files)]
    index = index_of(files, tmp_path / "cache")
    copied = index_of(copies, tmp_path / "cache")
    assert index.files[0].arrow != copied.files[0].arrow  # entries are per path
    assert copied.identity() == index.identity()
    assert index.identity()["rows"] == 120 and index.identity()["files"] == 2
    assert index_of(files[::-1], tmp_path / "cache").identity() != index.identity()  # another row order
    # one value changed (the same rows, shape and types): another identity
    seqs, labels = parts[1]
    seqs = [s.copy() for s in seqs]
    seqs[33][2, 0] += 1.0
    write_parquet(copies[1], seqs, labels)
    stat = copies[1].stat()
    os.utime(copies[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert copied.changed() is not None
    assert index_of(copies, tmp_path / "cache").identity() != index.identity()


def test_changed_names_a_modified_or_removed_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", *make_rows(40, 1))
    b = write_jsonl(tmp_path / "b.jsonl", *make_rows(40, 2))
    index = index_of([a, b], tmp_path / "cache")
    assert index.changed() is None
    stat = b.stat()
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert index.changed() is None  # a touch: the same bytes (hashed once, then the new time is remembered)
    text = b.read_text()
    b.write_text(text.replace("0.", "1.", 1))  # same size, other bytes
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 3_000_000_000))
    assert index.changed() == f"{b} was modified"
    with open(b, "a") as handle:
        handle.write(jsonl_line(np.zeros((T, 1)), 0) + "\n")
    assert index.changed().startswith(f"{b} changed size (")
    os.unlink(a)
    assert index.changed() == f"{a} is gone"  # the first file that differs


@pytest.mark.parametrize("new_inode", [False, True], ids=["in-place", "renamed-over"])
def test_a_same_size_rewrite_with_its_mtime_put_back_is_indexed_again(new_inode, settled, tmp_path):
    """Other bytes, the same size and modification time: the inode change time (and a new file's inode) tell
    it from the indexed version, at the next start and under a job that opened the old index."""
    seqs, labels = make_rows(120, 1)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    running = index_of([path], tmp_path / "cache")
    rewrite_putting_back_size_and_mtime(path, flipped(path, 70), new_inode)
    said = []
    again = index_of([path], tmp_path / "cache", said=said)
    assert f"distseq: {path} was modified since it was indexed: indexing it again" in said, said
    labels = labels.copy()
    labels[70] = 1 - labels[70]
    check_rows(again, seqs, labels, 1, False)  # the new rows, not the old index's
    assert running.changed() == f"{path} was modified"  # what a running job checks before each checkpoint


def test_a_rewrite_within_one_clock_tick_of_the_indexed_version_is_found(tmp_path, monkeypatch):
    """A file indexed just after it was written may be rewritten so soon after that write that a coarse
    file-system clock gives both the same ctime: a stat that young is not trusted (the file is hashed)."""
    path = write_jsonl(tmp_path / "a.jsonl", *make_rows(60, 1))
    running = index_of([path], tmp_path / "cache")  # within RACY_NS of the write: not yet settled
    indexed = filestat.FileStat.of(str(path))
    rewrite_putting_back_size_and_mtime(path, flipped(path, 7))
    real = filestat.FileStat.of
    monkeypatch.setattr(filestat.FileStat, "of", classmethod(  # the clock did not tick between the writes
        lambda cls, name: dataclasses.replace(real(name), ctime_ns=indexed.ctime_ns)))
    said = []
    index_of([path], tmp_path / "cache", said=said)
    assert f"distseq: {path} was modified since it was indexed: indexing it again" in said, said
    assert running.changed() == f"{path} was modified"


@pytest.mark.parametrize("how", ["touch", "cp -p"])
def test_the_same_bytes_touched_or_copied_are_hashed_once_then_trusted(how, settled, hashes, tmp_path):
    """A touch (a new mtime and ctime) or a copy that kept the mtime (a new inode) of the same bytes keeps
    the index: the bytes are hashed once, then the new stat is recorded and trusted without reading them."""
    seqs, labels = make_rows(80, 1)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    first = index_of([path], tmp_path / "cache")
    time.sleep(0.02)  # past a tick of the file system's clock
    if how == "touch":
        os.utime(path)
    else:
        os.replace(shutil.copy2(path, tmp_path / "copy.jsonl"), path)
    said = []
    second = index_of([path], tmp_path / "cache", said=said)
    assert said == [] and second.files[0].arrow == first.files[0].arrow
    assert hashes == [str(path)]
    stat = path.stat()
    record = record_of(tmp_path / "cache")
    assert (record["mtime_ns"], record["ctime_ns"], record["ino"]) == (stat.st_mtime_ns, stat.st_ctime_ns,
                                                                        stat.st_ino)
    assert first.changed() is None and second.changed() is None
    check_rows(index_of([path], tmp_path / "cache"), seqs, labels, 1, False)
    assert hashes == [str(path)]  # trusted by its stat from now on


def test_a_record_without_ctime_and_inode_is_verified_by_hash_once(settled, hashes, tmp_path, monkeypatch):
    """A record written before ctime and inode were recorded is still read: the file is hashed once (not
    indexed again), then its full stat is recorded."""
    path = write_jsonl(tmp_path / "a.jsonl", *make_rows(50, 1))
    index_of([path], tmp_path / "cache")
    (record_path,) = cache_files(tmp_path / "cache", "*.json")
    old = {k: v for k, v in json.loads(record_path.read_text()).items() if k not in ("ctime_ns", "ino")}
    record_path.write_text(json.dumps(old))
    monkeypatch.setattr(fi, "_build", lambda *args, **kwargs: pytest.fail("the file was indexed again"))
    said = []
    assert index_of([path], tmp_path / "cache", said=said).rows == 50 and said == []
    assert hashes == [str(path)]
    stat = path.stat()
    assert {k: record_of(tmp_path / "cache")[k] for k in ("ctime_ns", "ino")} == {"ctime_ns": stat.st_ctime_ns,
                                                                                    "ino": stat.st_ino}
    index_of([path], tmp_path / "cache")
    assert hashes == [str(path)]


# --- 6. real runs -------------------------------------------------------------------------------
@pytest.mark.parametrize("mtime", ["moved", "put-back"])
def test_resume_on_changed_data_is_refused(mtime, settled, tmp_path, capsys):
    seqs, labels = make_rows(100, 1)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    first = cli(train_args([path], tmp_path), capsys)
    assert first.returncode == 0, first.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000006"
    assert checkpoint.is_dir() and summary(tmp_path / "run")["step"] == 6
    if mtime == "put-back":  # same size, one label changed, the modification time restored (touch -r)
        rewrite_putting_back_size_and_mtime(path, flipped(path, 40))
    else:
        labels = labels.copy()
        labels[40] = 1 - labels[40]
        write_jsonl(path, seqs, labels)  # same size, one label changed
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2_000_000_000))
    proc = cli(train_args([path], tmp_path, "--max-steps", "12"), capsys)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, proc.stderr
    assert str(checkpoint) in err and "other data" in err and "100 rows" in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000006"]
    assert summary(tmp_path / "run")["step"] == 6
    assert str(path) in proc.stdout and "indexing it again" in proc.stdout  # the rebuild was announced


@pytest.mark.parametrize("change", ["touched", "copied-keeping-mtime", "rewritten", "rewritten-mtime-put-back"])
def test_a_file_modified_while_training_stops_without_saving(change, settled, tmp_path, capsys, monkeypatch):
    """Other bytes under a running job stop it at the next checkpoint, which is not written, even with the
    size and modification time put back; a touch or a copy of the same bytes (a backup tool, a sync) does
    not."""
    path = write_jsonl(tmp_path / "a.jsonl", *make_rows(100, 1))
    real, calls = FileSource.samples, []

    def samples(self, positions):
        calls.append(len(positions))
        if len(calls) == 1:  # while the run trains (this call feeds several steps): the file changes
            if change == "rewritten-mtime-put-back":
                rewrite_putting_back_size_and_mtime(path, path.read_text().replace("0.", "1.", 1))
            elif change == "copied-keeping-mtime":
                os.replace(shutil.copy2(path, tmp_path / "copy.jsonl"), path)
            else:
                if change == "rewritten":
                    path.write_text(path.read_text().replace("0.", "1.", 1))  # the same size
                os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2_000_000_000))
        return real(self, positions)

    monkeypatch.setattr(FileSource, "samples", samples)
    proc = cli(train_args([path], tmp_path, "--checkpoint-every", "3"), capsys)
    err = proc.stderr.strip()
    if change in ("touched", "copied-keeping-mtime"):
        assert proc.returncode == 0 and summary(tmp_path / "run")["step"] == 6, proc.stderr
        return
    assert proc.returncode == 2 and len(err.splitlines()) == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr)
    assert f"{path} was modified while this run trained on it" in err and "stopped at step 3 without saving" in err
    assert not (tmp_path / "run" / "checkpoints").is_dir() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_resume_on_the_same_bytes_rewritten_is_accepted(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", *make_rows(100, 1))
    assert cli(train_args([path], tmp_path), capsys).returncode == 0
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)  # another inode and modification time, the same rows
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2_000_000_000))
    proc = cli(train_args([path], tmp_path, "--max-steps", "12"), capsys)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout and "step-00000006" in proc.stdout
    assert summary(tmp_path / "run")["step"] == 12


def test_resume_from_a_copy_at_another_path(tmp_path, capsys):
    """Indexed files are identified by their content: the same bytes at another path resume (the change of
    --data-files is reported); other bytes there are refused."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    path = write_jsonl(tmp_path / "one" / "a.jsonl", *make_rows(100, 1))
    copy = Path(shutil.copy(path, tmp_path / "two" / "a.jsonl"))
    assert cli(train_args([path], tmp_path), capsys).returncode == 0
    proc = cli(train_args([copy], tmp_path, "--max-steps", "12"), capsys)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout and f"--data-files {path} -> {copy}" in proc.stdout
    assert summary(tmp_path / "run")["step"] == 12
    write_jsonl(copy, *make_rows(100, 5))
    refused = cli(train_args([copy], tmp_path, "--max-steps", "18"), capsys)
    assert refused.returncode == 2 and "was trained on other data" in refused.stderr


def test_old_index_files_and_debris_are_removed_when_an_entry_is_rebuilt(tmp_path):
    """Good, then bad, then fixed: one index file is left, and a build killed half-way leaves nothing."""
    seqs, labels = make_rows(60, 1)
    path = write_jsonl(tmp_path / "a.jsonl", seqs, labels)
    cache = tmp_path / "cache"
    index_of([path], cache)
    (cache / "files" / f".tmp-999-{Path(index_of([path], cache).files[0].arrow).name}").write_bytes(b"half")
    with open(path, "a") as handle:
        handle.write(json.dumps({"sequence": [0.5] * T, "label": 3}) + "\n")
    with pytest.raises(Exception, match="must be 0 or 1"):
        index_of([path], cache)
    assert list((cache / "files").glob("*.arrow")) == [] and list((cache / "files").glob(".tmp-*")) == []
    path.write_text(path.read_text().replace('"label": 3', '"label": 1.0'))
    index = index_of([path], cache)
    assert index.rows == 61 and [str(p) for p in (cache / "files").glob("*.arrow")] == [index.files[0].arrow]


def test_an_io_error_while_indexing_is_not_remembered(tmp_path, monkeypatch):
    """A read that fails (EIO) is one line for this run; the next run reads the file again."""
    import pyarrow.json as pj

    from distseq.errors import DataFileError

    path = write_jsonl(tmp_path / "a.jsonl", *make_rows(30, 1))
    real = pj.open_json

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(pj, "open_json", failing)
    with pytest.raises(DataFileError, match=f"{path}: cannot read: Input/output error") as error:
        index_of([path], tmp_path / "cache")
    assert error.value.every_rank  # this process met it: it says so itself
    monkeypatch.setattr(pj, "open_json", real)
    assert index_of([path], tmp_path / "cache").rows == 30


RANKS_READ_OTHER_FILES = """
import sys
from accelerate import Accelerator
from distseq.data.index import check_same_everywhere, open_index
from distseq.registry import TASKS
from distseq.tasks import TaskSpec

accelerator = Accelerator(cpu=True)
files = sys.argv[1 + accelerator.process_index]  # node-local copies that differ
index = open_index([files], TASKS["sum-sign"], TaskSpec(6, 6), "sequence", "label", sys.argv[3],
                   lambda line: None, progress=False)
try:
    check_same_everywhere(index, accelerator)
    outcome = "same"
except Exception as error:
    outcome = f"{type(error).__name__}: {error} every_rank={error.every_rank}"
with open(f"{sys.argv[3]}/rank{accelerator.process_index}.txt", "w") as out:
    out.write(outcome)
accelerator.end_training()  # a group left to the interpreter's exit may abort (SIGABRT) when its peer left first
"""


def test_ranks_that_indexed_different_rows_are_stopped(tmp_path):
    """Two real processes whose copies of the data differ: both stop, with one line naming the ranks."""
    script = tmp_path / "check.py"
    script.write_text(RANKS_READ_OTHER_FILES)
    a = write_jsonl(tmp_path / "a.jsonl", *make_rows(40, 1))
    b = write_jsonl(tmp_path / "b.jsonl", *make_rows(30, 2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(a), str(b), str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=cpu_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):
        line = (tmp_path / "cache" / f"rank{rank}.txt").read_text()
        assert line.startswith("BadData: --data-files differ between processes: rank 1 reads 30 rows"), line
        assert "rank 0 40 (sha256" in line and line.endswith("every_rank=False")


def test_jsonl_mixing_the_forms_of_steps_across_rows_is_one_line(tmp_path):
    """Steps as numbers in one row and as [v] lists in the next: each row reads alone, the file not."""
    from distseq.errors import DataFileError

    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"sequence": [0.5] * T, "label": 1}) + "\n"
                    + json.dumps({"sequence": [[0.5]] * T, "label": 0}) + "\n")
    with pytest.raises(DataFileError) as error:
        index_of([path], tmp_path / "cache")
    message = str(error.value)
    assert message.startswith(f"{path}: cannot parse: ") and "both as numbers and as [v] lists" in message
    assert len(message.splitlines()) == 1
