"""Your own tokens for ``--task lm``: documents of token ids as one memory-mapped token array, cut into windows.

**Files.** Each file of ``--data-files`` is a list of documents:
- ``.parquet`` / ``.jsonl``: one document per row, a list of token ids in ``--sequence-column``;
- ``.bin``: a flat array of ``--token-dtype`` ids (little-endian, as nanoGPT's ``prepare.py`` writes), one
  document, or several when ``NAME.offsets.npy`` (int64 document starts: 0, then increasing) lies beside it;
- ``.txt``: one document, its text encoded by the run's codec (``data/text.py``: bytes, or a tokenizer.json).

**The index.** Each file is read once, every id checked against the vocabulary, and written as an Arrow
file in the ``--data-files`` cache (``data/index.py``: the same entry names, identity, locking, damage
checks and bad-data records): one row per document, a list of ids with ``--eod-id`` appended when there is
one. One record batch per file, so the list's values buffer *is* the file's token array and its offsets
buffer the document starts, both read zero-copy from the memory map. Ids are kept as uint8, uint16 or
uint32, the smallest that holds the vocabulary.

**Windows.** The files' token arrays in order are one global array ``A`` of ``L`` tokens. A window is
``seq_len + 1`` tokens: ``x`` its first ``seq_len``, ``y`` the next token of each (the ignore index where
the window ends early, with ``x`` padded by the end-of-document id, else 0).
- ``packed``: window ``p`` starts at ``p * seq_len`` and runs across document (and file) boundaries;
  there are ``ceil((L - 1) / seq_len)`` windows, the last one partial: no token is left out.
- ``document``: each document of ``n`` tokens gives ``ceil((n - 1) / seq_len)`` windows at the same stride,
  cut at its end; a table of window starts and ends (two int64 per window) is made when the index opens.
Window ``p`` is an O(1) function of ``p``, so the order, the sharding and the resume of the other files
(``FileSource``: positions, epochs reshuffled by a permutation, held-out shares) apply unchanged.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from distseq.data.files import TOKEN_FORMATS, first_json_row
from distseq.data.filestat import FileStat
from distseq.data.index import (
    JSON_BLOCK_BYTES,
    MAX_JSON_BLOCK_BYTES,
    DamagedIndex,
    IndexCache,
    IndexedFile,
    cache_root,
    finish_index,
    index_files,
    index_intact,
    index_writer,
)
from distseq.data.text import is_text
from distseq.errors import ConfigError, DataFileError
from distseq.fsio import sha256_file
from distseq.tasks import Batch
from distseq.tasks.heads import IGNORE

OFFSETS_SUFFIX = ".offsets.npy"


def offsets_file(path: str) -> Path:
    """Where a .bin file's document starts lie: ``NAME.offsets.npy`` beside ``NAME.bin``."""
    return Path(path).with_suffix(OFFSETS_SUFFIX)


def token_format(path: str) -> str:
    return TOKEN_FORMATS[Path(path).suffix.lower()]


def storage_dtype(vocab: int) -> np.dtype:
    """The smallest unsigned integer type holding ids ``[0, vocab)``."""
    return np.dtype(np.uint8 if vocab <= 1 << 8 else np.uint16 if vocab <= 1 << 16 else np.uint32)


@dataclass(frozen=True)
class TokenLayout:
    """What a token index holds, hence part of its cache key: how the file is read and what is appended."""

    kind: str  # "tokens": never the name of a row index's entry
    column: str  # of parquet/JSON-lines files
    vocab: int  # every id is checked below it
    eod_id: Optional[int]  # appended to each document; None: documents joined as they are
    token_dtype: str  # of .bin files
    codec: str  # of .txt files: "bytes", or the tokenizer.json's sha256

    @property
    def storage(self) -> np.dtype:
        return storage_dtype(self.vocab)


# --- reading a file: (ids (n,), document lengths (d,)) --------------------------------------------------
def read_documents(path: str, layout: TokenLayout, codec) -> Tuple[np.ndarray, np.ndarray]:
    """A file's token ids and its documents' lengths, every id checked; DataFileError naming the file and the
    row (or offset) of the first bad one."""
    fmt = token_format(path)
    if fmt == "bin":
        ids, lengths = _read_bin(path, layout)
    elif fmt == "text":
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise DataFileError(f"{path}: cannot read: {error.strerror or error}") from None
        ids = codec.encode_file(data, path)
        lengths = np.array([len(ids)], dtype=np.int64)
        if not len(ids):
            raise DataFileError(f"{path} has no documents (every file of --data-files must hold some)")
    else:
        ids, lengths = _read_lists(path, layout, fmt)
    if not len(lengths):
        raise DataFileError(f"{path} has no documents (every file of --data-files must hold some)")
    _check_range(ids, lengths, layout, path, fmt)
    return ids, lengths


def _read_bin(path: str, layout: TokenLayout) -> Tuple[np.ndarray, np.ndarray]:
    dtype = np.dtype(layout.token_dtype).newbyteorder("<")
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        whole = size - size % dtype.itemsize
        raise DataFileError(f"{path}: truncated: {size} bytes is not a whole number of {layout.token_dtype} tokens "
                            f"({dtype.itemsize} bytes each); the last token, at byte offset {whole}, is cut "
                            f"(--token-dtype says the id type)")
    if size == 0:
        raise DataFileError(f"{path} has no documents (every file of --data-files must hold some)")
    ids = np.memmap(path, dtype=dtype, mode="r")
    companion = offsets_file(path)
    if not companion.exists():
        return ids, np.array([len(ids)], dtype=np.int64)
    try:
        starts = np.load(companion, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataFileError(f"{companion}: cannot be read as a .npy array ({str(error).splitlines()[0]})") from None
    if starts.ndim != 1 or not np.issubdtype(starts.dtype, np.integer) or not len(starts):
        raise DataFileError(f"{companion}: must be a 1-D integer array of document starts (got shape "
                            f"{starts.shape}, {starts.dtype})")
    if starts.dtype == np.uint64 and starts.max() > np.iinfo(np.int64).max:
        raise DataFileError(f"{companion}: a start past the file's {len(ids)} tokens ({int(starts.max())})")
    starts = starts.astype(np.int64)
    ends = np.append(starts[1:], len(ids))
    if starts[0] != 0:
        raise DataFileError(f"{companion}: the first document must start at token 0 (got {int(starts[0])})")
    past = np.flatnonzero(starts >= len(ids))
    if len(past):
        raise DataFileError(f"{companion}: document {int(past[0])} (from 0) starts at token {int(starts[past[0]])}, "
                            f"past the file's {len(ids)} tokens")
    bad = np.flatnonzero(ends <= starts)
    if len(bad):
        i = int(bad[0])
        what = "an empty document" if ends[i] == starts[i] else "starts must increase"
        raise DataFileError(f"{companion}: document {i} (from 0) starts at token {int(starts[i])} and ends at "
                            f"{int(ends[i])}: {what} (the file holds {len(ids)} tokens)")
    return ids, ends - starts


def _read_lists(path: str, layout: TokenLayout, fmt: str) -> Tuple[np.ndarray, np.ndarray]:
    """One document per row: a list of integer ids in ``layout.column``."""
    import pyarrow as pa

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=[layout.column])
        else:
            table = _read_json(path, layout)
    except OSError as error:
        raise DataFileError(f"{path}: cannot read: {error.strerror or error}") from None
    except (KeyError, pa.ArrowException) as error:
        message = str(error).splitlines()[0] if str(error) else repr(error)
        raise DataFileError(f"{path}: cannot read column {layout.column!r} (--sequence-column): {message}") from None
    column = table.column(layout.column).combine_chunks()
    listed = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    if not listed or not pa.types.is_integer(column.type.value_type):
        raise DataFileError(f"{path}: {layout.column!r} must hold a list of integer token ids per row (it holds "
                            f"{column.type})")
    return _documents(column, path, layout)


def _documents(column, path: str, layout: TokenLayout) -> Tuple[np.ndarray, np.ndarray]:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)  # (d,), NaN where null
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(nulls | (np.nan_to_num(lengths, nan=0) == 0))
    if len(empty):
        row = int(empty[0])
        what = f"missing {layout.column!r}" if nulls[row] else "an empty document"
        raise DataFileError(f"{path}: row {row} (from 0): {what}")
    values = pc.list_flatten(column)
    if values.null_count:
        parents = pc.list_parent_indices(column).to_numpy()
        row = int(parents[np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]])
        raise DataFileError(f"{path}: row {row} (from 0): {layout.column!r} holds a null token id")
    return values.to_numpy(zero_copy_only=False), lengths.astype(np.int64)


def _read_json(path: str, layout: TokenLayout):
    import pyarrow as pa
    import pyarrow.json as pj

    schema = pa.schema([(layout.column, pa.list_(pa.int64()))])
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    if first_json_row(path) is None:  # no line holds anything: pyarrow would say "Empty JSON file"
        return pa.table({layout.column: pa.array([], type=pa.list_(pa.int64()))})
    block = JSON_BLOCK_BYTES
    while True:
        try:
            return pj.read_json(path, read_options=pj.ReadOptions(block_size=block), parse_options=options)
        except pa.ArrowInvalid as error:
            if "straddl" in str(error) and block < MAX_JSON_BLOCK_BYTES:
                block *= 8
                continue
            raise DataFileError(_json_problem(path, layout) or f"{path}: cannot parse: "
                                                               f"{str(error).splitlines()[0]}") from None


def _json_problem(path: str, layout: TokenLayout) -> Optional[str]:
    """The first row of a JSON-lines file pyarrow refused, said in Python's terms (streamed)."""
    with open(path, "rb") as handle:
        row = -1
        for line in handle:
            if not line.strip():
                continue
            row += 1
            where = f"{path}: row {row} (from 0)"
            try:
                data = json.loads(line)
            except ValueError as error:
                return f"{where}: not valid JSON: {error}"
            if not isinstance(data, dict):
                return f"{where}: not a JSON object"
            if data.get(layout.column) is None:
                return f"{where}: missing {layout.column!r}"
            ids = data[layout.column]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                return f"{where}: {layout.column!r} must be a list of integer token ids"
            outside = next((t for t in ids if not 0 <= t < layout.vocab), None)
            if outside is not None:
                return f"{where}: token id {outside} is outside [0, {layout.vocab}) (--vocab-size)"
    return None


def _check_range(ids: np.ndarray, lengths: np.ndarray, layout: TokenLayout, path: str, fmt: str) -> None:
    """Every id in ``[0, vocab)``; the first that is not names its row (lists) or its offset (flat files)."""
    if not len(ids):
        return
    low, high = ids.min(), ids.max()
    if low >= 0 and high < layout.vocab:
        return
    k = int(np.flatnonzero((ids < 0) | (ids >= layout.vocab))[0])
    where = (f"token {k} (byte offset {k * ids.dtype.itemsize})" if fmt == "bin" else f"token {k}" if fmt == "text"
             else f"row {int(np.searchsorted(np.cumsum(lengths), k, side='right'))} (from 0)")
    source = "the tokenizer's vocabulary" if fmt == "text" else "--vocab-size"
    raise DataFileError(f"{path}: {where}: token id {int(ids[k])} is outside [0, {layout.vocab}) ({source})")


def pack_documents(ids: np.ndarray, lengths: np.ndarray, eod_id: Optional[int], dtype: np.dtype
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens (n + d,) with ``eod_id`` after each document, or (n,) without; offsets (d + 1,) int64)."""
    if eod_id is None:
        return np.ascontiguousarray(ids, dtype=dtype), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ends = np.cumsum(lengths + 1)  # one past each document's end-of-document id
    tokens = np.empty(int(ends[-1]), dtype=dtype)
    eod = np.zeros(len(tokens), dtype=bool)
    eod[ends - 1] = True
    tokens[~eod] = ids
    tokens[eod] = eod_id
    return tokens, np.concatenate([[0], ends]).astype(np.int64)


def build_token_index(path: str, arrow: Path, layout: TokenLayout, codec, advance: Callable[[int], None]
                      ) -> Tuple[int, str, str]:
    """Read, check and pack ``path`` into the Arrow file ``arrow`` (a temporary name, then renamed): (documents,
    sha256 of the file, sha256 of the index)."""
    import pyarrow as pa

    ids, lengths = read_documents(path, layout, codec)
    tokens, offsets = pack_documents(ids, lengths, layout.eod_id, layout.storage)
    documents = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(tokens))
    schema = pa.schema([("document", documents.type)])
    with index_writer(arrow, schema) as writer:
        writer.write_batch(pa.record_batch([documents], schema=schema))  # one batch: one values buffer
    advance(os.path.getsize(path))
    return (len(lengths), *finish_index(path, arrow))


class TokenCache(IndexCache):
    """The cache of token indexes: ``IndexCache``'s entries, locks and records, with a token file's reader. A
    .bin file's offsets file is part of its entry: another one (or one added, or removed) indexes it again."""

    def __init__(self, root: Path, layout: TokenLayout, codec):
        super().__init__(root, layout, None, None)
        self.codec = codec

    def _build_file(self, path: str, arrow: Path, advance: Callable[[int], None]) -> Tuple[int, str, str]:
        before = companion_state(path)  # what the record will say: the offsets as they were read
        built = build_token_index(path, arrow, self.shape, self.codec, advance)
        if companion_state(path, before) != before:
            raise DataFileError(f"{offsets_file(path)} changed while {path} was being indexed; run again when it "
                                f"is complete")
        self._companion = before
        return built

    def _fits(self, table, record: dict) -> bool:
        column = table.schema.field("document").type
        stored = np.dtype(column.value_type.to_pandas_dtype())
        return table.num_rows == record.get("rows") and stored == self.shape.storage

    def _version_tag(self, path: str) -> str:
        companion = companion_state(path)
        return "" if companion is None else f"-{companion['sha256'][:12]}"

    def _extra(self, path: str) -> dict:
        return {"companion": self.__dict__.pop("_companion", None) or companion_state(path)}

    def _look(self, path: str):
        reason, record, now = super()._look(path)
        if reason is None and record is not None:
            if companion_state(path, record.get("companion")) != record.get("companion"):
                return f"has another {offsets_file(path).name} since it was indexed", record, now
        return reason, record, now


def companion_state(path: str, known: Optional[dict] = None) -> Optional[dict]:
    """A .bin file's offsets file as a record keeps it (stat and sha256), None when there is none: ``known`` itself
    while it holds the same bytes (read only when the stat cannot vouch for them, as ``filestat`` decides)."""
    companion = offsets_file(path)
    if token_format(path) != "bin" or not companion.is_file():
        return None
    stat = FileStat.of(str(companion))
    if known is not None and stat.vouches_for(known):
        return known
    sha = sha256_file(companion)
    if known is not None and known.get("sha256") == sha:
        return known
    return {**stat.fields(), "sha256": sha}


class TokenIndex:
    """Windows of ``seq_len + 1`` tokens over the indexed files (the module's docstring): ``rows`` windows,
    ``take(ids)`` -> ``x``, ``y`` (n, seq_len) int64. The FileIndex interface, so ``FileSource`` serves them.
    Opens its memory maps lazily (per process: it pickles as paths, so DataLoader workers open their own)."""

    def __init__(self, files: List[IndexedFile], records: List[dict], layout: TokenLayout, seq_len: int,
                 packing: str):
        self.files, self.records, self.layout, self.seq_len, self.packing = files, records, layout, seq_len, packing
        self.documents = sum(f.rows for f in files)
        self._arrays: Optional[List[np.ndarray]] = None
        self._starts: Optional[np.ndarray] = None  # (files + 1,) global token offset of each file
        self._windows: Optional[Tuple[np.ndarray, np.ndarray]] = None  # document packing: (start, end) per window
        self._open()  # the token count and the windows come from the maps (no copy)
        self.tokens = int(self._starts[-1])
        self.rows = (max(0, math.ceil((self.tokens - 1) / seq_len)) if packing == "packed" else
                     len(self._windows[0]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None, "_starts": None, "_windows": None}

    @property
    def pad_id(self) -> int:
        return self.layout.eod_id if self.layout.eod_id is not None else 0

    def sample_bytes(self) -> int:
        return 2 * 8 * self.seq_len + 8 + 8

    def describe(self) -> str:
        eod = (f"end-of-document id {self.layout.eod_id}" if self.layout.eod_id is not None else
               "documents joined without an end-of-document id (--eod-id sets one)")
        return (f"{self.tokens} tokens in {self.documents} document(s) of {len(self.files)} file(s), {eod}; "
                f"{self.rows} windows of {self.seq_len}+1 tokens ({self.packing})")

    def identity(self) -> dict:
        """What the tokens are, independent of where the files lie: recorded in checkpoints."""
        import hashlib

        digest = hashlib.sha256()
        for f, record in zip(self.files, self.records):
            companion = (record.get("companion") or {}).get("sha256", "")
            digest.update(f"{f.sha256}:{companion}:{f.rows};".encode())
        digest.update(json.dumps(asdict(self.layout), sort_keys=True).encode())  # the codec, the ids appended
        return {"rows": self.rows, "files": len(self.files), "tokens": self.tokens, "sha256": digest.hexdigest(),
                "codec": self.layout.codec}

    def changed(self) -> Optional[str]:
        for f, record in zip(self.files, self.records):
            how = f.change()
            if how:
                return how
            if companion_state(f.path, record.get("companion")) != record.get("companion"):
                return f"{offsets_file(f.path)} changed"
        return None

    def damaged(self) -> Optional[str]:
        bad = next((f for f in self.files if not index_intact(f.arrow, f.index_sha256)), None)
        return None if bad is None else f"{bad.arrow}, the index of {bad.path}, was damaged"

    def open(self) -> "TokenIndex":
        if self._arrays is None:
            self._open()
        return self

    def _open(self) -> None:
        import pyarrow as pa

        arrays, starts, document_starts = [], [0], []
        for f in self.files:
            if not index_intact(f.arrow, f.index_sha256):
                raise DamagedIndex(f"{f.arrow}, the index of {f.path}, was damaged after this run checked it; run "
                                   f"again: distseq indexes the file again (a run resumes from its last checkpoint)")
            try:
                table = pa.ipc.open_stream(pa.memory_map(f.arrow)).read_all()
                column = table.column("document")
                documents = column.chunk(0) if column.num_chunks == 1 else None
            except (OSError, KeyError, pa.ArrowInvalid) as error:
                raise DataFileError(f"{f.path}: its index {f.arrow} cannot be read ({str(error).splitlines()[0]}); "
                                    f"another job may have indexed the file again: restart the run") from None
            if documents is None or len(documents) != f.rows:
                raise DataFileError(f"{f.path}: its index {f.arrow} does not hold {f.rows} documents in one batch: "
                                    f"it was damaged after this run opened it; restart the run")
            tokens = documents.values.to_numpy(zero_copy_only=True)  # (n,) the memory map itself
            offsets = documents.offsets.to_numpy(zero_copy_only=True)  # (d + 1,)
            arrays.append(tokens)
            document_starts.append(offsets + starts[-1])
            starts.append(starts[-1] + len(tokens))
        self._arrays, self._starts = arrays, np.asarray(starts, dtype=np.int64)
        if self.packing == "document":
            self._windows = document_windows(document_starts, self.seq_len)

    def window_bounds(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(first token, one past the last token it may read) of windows ``ids`` (n,), in the global array."""
        if self.packing == "packed":
            return ids * self.seq_len, np.full(len(ids), self.tokens, dtype=np.int64)
        starts, ends = self._windows
        return starts[ids], ends[ids]

    def take(self, ids: torch.Tensor) -> Batch:
        """Windows ``ids`` (int64, any order) -> ``x`` (n, T) ids, ``y`` (n, T) next ids (IGNORE past the end)."""
        if self._arrays is None:
            self._open()
        T = self.seq_len
        first, end = self.window_bounds(ids.numpy())
        positions = first[:, None] + np.arange(T + 1)  # (n, T + 1)
        inside = positions < end[:, None]
        tokens = self._gather(np.minimum(positions, self.tokens - 1)).astype(np.int64)  # (n, T + 1)
        x = np.where(inside[:, :T], tokens[:, :T], self.pad_id)
        y = np.where(inside[:, 1:], tokens[:, 1:], IGNORE)
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(y)}

    def _gather(self, positions: np.ndarray) -> np.ndarray:
        if len(self._arrays) == 1:
            return self._arrays[0][positions]
        out = np.empty(positions.shape, dtype=self.layout.storage)
        file_of = np.searchsorted(self._starts, positions, side="right") - 1
        for f in np.unique(file_of):  # a window rarely spans two files: usually one group
            where = file_of == f
            out[where] = self._arrays[f][positions[where] - self._starts[f]]
        return out


def document_windows(document_starts: List[np.ndarray], seq_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """(start, end) of every window of ``document`` packing, in order: each document of n tokens gives
    ceil((n - 1) / seq_len) windows at stride seq_len, none reading past its end."""
    bounds = np.concatenate([offsets[:-1] for offsets in document_starts]), \
        np.concatenate([offsets[1:] for offsets in document_starts])
    starts, ends = bounds
    counts = (ends - starts - 1 + seq_len - 1) // seq_len  # (d,)
    first = np.repeat(starts, counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return first + within * seq_len, np.repeat(ends, counts)


def check_token_files(files: List[str], option: str = "--data-files", text: Optional[bool] = None) -> bool:
    """Whether ``files`` are text (else token ids): all one kind (their ids are not the same vocabulary), and the
    kind ``text`` says when given (held-out files of the training files' kind)."""
    kinds = {is_text(f) for f in files}
    if len(kinds) > 1:
        raise ConfigError(option, "give either text files (.txt) or token files (.bin, .parquet, .jsonl), not both: "
                                  "their ids are not the same vocabulary")
    (is_text_now,) = kinds
    if text is not None and is_text_now != text:
        what = {True: "text", False: "token ids"}
        raise ConfigError(option, f"hold {what[is_text_now]}, the run's --data-files {what[text]}: give files of "
                                  f"the same kind")
    return is_text_now


def open_token_index(files: List[str], layout: TokenLayout, codec, seq_len: int, packing: str,
                     cache: Optional[str], say: Callable[[str], None], progress: bool,
                     option: str = "--data-files") -> TokenIndex:
    """The token index of ``files`` (built where missing or stale, with a progress bar), ready to read."""
    check_token_files(files, option)
    token_cache = TokenCache(cache_root(cache), layout, codec)
    indexed, seconds = index_files(files, token_cache, say, progress)
    records = [token_cache.record(f.path) or {} for f in indexed]
    index = TokenIndex(indexed, records, layout, seq_len, packing)
    if seconds is not None:
        say(f"distseq: indexed {index.tokens} tokens of {len(files)} file(s) in {seconds:.1f} s")
    if index.rows == 0:
        raise DataFileError(f"--data-files hold {index.tokens} token(s): no window of {seq_len}+1 tokens has a "
                            f"next token to learn (each document needs 2 tokens at least)")
    return index
