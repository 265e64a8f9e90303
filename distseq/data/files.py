"""Your own data: what ``--data-files`` are, and what one row must hold.

Each row holds a sequence (a list of numbers, or of F-number lists) and one label. This module
resolves the files (paths or globs, comma-separated, in that order; a glob's matches sorted),
checks them cheaply before a run (each exists, holds rows and both columns), and turns one row into
a sample or a one-line error naming the file and the row (``row_to_sample``). The indexed dataset
(``file_index.py``) and the streaming path (``file_stream.py``) both report bad rows with it, and
``predict`` parses its inputs with ``sequence_to_tensor``.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import List, Optional

import torch

from distseq.data.text import TEXT_SUFFIXES
from distseq.errors import ConfigError, DataFileError
from distseq.tasks import IGNORE, Task, TaskSpec

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# --task lm's files (data/tokens.py), by suffix: token ids, or text read through a codec
TOKEN_FORMATS = {".bin": "bin", ".parquet": "parquet", ".jsonl": "json", ".json": "json",
                 **{suffix: "text" for suffix in TEXT_SUFFIXES}}
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def resolve_files(pattern: str, option: str = "--data-files", tokens: bool = False) -> List[str]:
    """Expand ``--data-files`` (or ``option``: paths or globs, comma-separated) to a sorted, checked list of files;
    ``tokens``: the formats of ``--task lm`` (token and text files)."""
    files: List[str] = []
    for part in filter(None, (p.strip() for p in pattern.split(","))):
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if len(matches) == 1 and Path(matches[0]).is_dir():
            raise ConfigError(option, f"{part} is a directory: "
                                              f"give its files (e.g. {Path(part) / '*.parquet'})")
        if not matches or not all(Path(m).is_file() for m in matches):
            raise ConfigError(option, f"no such file: {part}")
        files += matches
    if not files:
        raise ConfigError(option, "no files given")
    seen = {}
    for path in files:
        real = str(Path(path).resolve())
        if real in seen:
            raise ConfigError(option, f"{path} is listed twice (as {seen[real]} too): "
                                              "each file's rows count once")
        seen[real] = path
    suffixes = {Path(f).suffix.lower() if tokens else Path(f).suffix for f in files}
    if tokens:
        if not suffixes <= TOKEN_FORMATS.keys():
            raise ConfigError(option, f"--task lm reads token files (.bin, .parquet, .jsonl) or text files (.txt) "
                                      f"(got {', '.join(sorted(suffixes - TOKEN_FORMATS.keys()))})")
        return files
    if not suffixes <= FORMATS.keys() or len({FORMATS[s] for s in suffixes}) != 1:
        raise ConfigError(option, "files must all be .jsonl/.json or all .parquet "
                                  f"(got {', '.join(sorted(suffixes))})")
    return files


def file_format(path: str) -> str:
    """``parquet`` or ``json`` (JSON lines), from the file's suffix."""
    return FORMATS[Path(path).suffix]


def first_json_row(path: str) -> Optional[tuple]:
    """(row number, the first non-blank line of a JSON-lines file parsed), None for a file without rows."""
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                try:
                    return 0, json.loads(line)
                except ValueError as error:
                    raise DataFileError(f"{path}: row 0 (from 0): not valid JSON: {error}") from None
    return None


def file_columns(path: str) -> Optional[List[str]]:
    """The column names of a file (parquet: its schema; JSON lines: its first row), None when it holds no
    rows; a one-line ConfigError when it cannot be read as its suffix says."""
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_metadata(path)
        except Exception as error:  # not a parquet file: one line naming it
            raise ConfigError("--data-files", f"{path} is not a readable parquet file: "
                                              f"{str(error).splitlines()[0]}") from None
        return metadata.schema.to_arrow_schema().names if metadata.num_rows > 0 else None
    try:
        first = first_json_row(path)
    except DataFileError as error:
        raise ConfigError("--data-files", str(error)) from None
    if first is None:
        return None
    if not isinstance(first[1], dict):
        raise ConfigError("--data-files", f"{path}: row 0 (from 0): not a JSON object")
    return list(first[1])


def check_files(files: List[str], sequence_column: str, label_column: str) -> None:
    """Every file has rows and both columns (say which it has if not); cheap for any size: a parquet
    footer, a JSON-lines file's first row."""
    for path in files:
        columns = file_columns(path)
        if columns is None:
            raise ConfigError("--data-files", f"{path} has no rows (every file of --data-files must hold some)")
        for option, column in (("--sequence-column", sequence_column), ("--label-column", label_column)):
            if column not in columns:
                raise ConfigError(option, f"column {column!r} is not in {path} (columns: {', '.join(columns)})")


def sequence_to_tensor(sequence, where: str, column: str, task: Task, spec: TaskSpec):
    """One sequence -> (x (T, F) zero-padded, length); DataFileError naming ``where`` otherwise. A token
    task's sequence is a list of token ids -> (x (T,) int64, length)."""
    if task.tokens:
        return _tokens_to_tensor(sequence, where, column, task, spec)
    try:
        if _holds_bool(sequence):  # torch would take True as 1.0: a boolean is not a number here
            raise TypeError
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


def _holds_bool(sequence) -> bool:
    """Whether a sequence (a list of numbers, or of lists of numbers) holds a boolean anywhere."""
    if not isinstance(sequence, list):
        return isinstance(sequence, bool)
    return any(isinstance(v, bool) or (isinstance(v, list) and any(isinstance(w, bool) for w in v)) for v in sequence)


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


def labels_to_tensor(label, length: int, where: str, column: str, task: Task, spec: TaskSpec) -> torch.Tensor:
    """A per-step task's labels: a list as long as the sequence, a class per position or the ignore index (-100,
    or null) where there is none -> (T,) int64, IGNORE past the sequence's end; DataFileError naming ``where``."""
    classes = task.num_outputs(spec)
    if not isinstance(label, list):
        raise DataFileError(f"{where}: {column!r} must be a list of labels, one per position ({_shown(label)})")
    if len(label) != length:
        raise DataFileError(f"{where}: {column!r} holds {len(label)} labels for a sequence of {length}: one per "
                            f"position (-100 or null where there is none)")
    for position, value in enumerate(label):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if value is None or number and value == IGNORE:
            continue
        if not number or value != int(value) or not 0 <= value < classes:
            shown = int(value) if number and value == int(value) else value  # JSON's 32 is read as 32.0
            raise DataFileError(f"{where}: {column!r} holds {_shown(shown)} at position {position}: a label is a "
                                f"class in 0..{classes - 1} for --task {task.name}, or -100 or null for none")
    y = torch.full((spec.seq_len,), IGNORE, dtype=torch.int64)
    y[:length] = torch.tensor([IGNORE if v is None else int(v) for v in label], dtype=torch.int64)
    return y


def _shown(value, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def row_to_sample(row: dict, sequence_column: str, label_column: str, task: Task, spec: TaskSpec):
    """One row -> (x (T, F) zero-padded, or (T,) ids, length, y: a number, or (T,) labels of a per-step task);
    DataFileError naming the file and row otherwise."""
    where = f"{row['file']}: row {row['row']} (from 0)"
    data = row["data"]
    sequence, label = data.get(sequence_column), data.get(label_column)
    if sequence is None or label is None:
        missing = sequence_column if sequence is None else label_column
        raise DataFileError(f"{where}: missing {missing!r}")
    x, length = sequence_to_tensor(sequence, where, sequence_column, task, spec)
    if task.head == "per-step":
        return x, length, labels_to_tensor(label, length, where, label_column, task, spec)
    if not isinstance(label, (int, float)) or isinstance(label, bool) or not math.isfinite(label):
        raise DataFileError(f"{where}: {label_column!r} is not a number ({_shown(label)})")
    if abs(label) > FLOAT32_MAX:
        raise DataFileError(f"{where}: {label_column!r} is too large for float32 ({label!r})")
    if task.head == "binary" and label not in (0, 1):
        raise DataFileError(f"{where}: {label_column!r} must be 0 or 1 for --task {task.name} (got {label:g})")
    if task.head == "classes":
        classes = task.num_outputs(spec)
        if label != int(label) or not 0 <= label < classes:
            raise DataFileError(f"{where}: {label_column!r} must be a class in 0..{classes - 1} for --task "
                                f"{task.name} (got {label:g})")
        return x, length, int(label)
    return x, length, float(label)
