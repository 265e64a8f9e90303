"""Text as token ids: its bytes (vocabulary 256), or a user's own ``tokenizer.json`` (the ``tokenizers``
library, read from the file given: nothing is ever downloaded).

A ``Codec`` turns text into ids and back; the language-modelling index (``data/tokens.py``) encodes the
``.txt`` files of ``--data-files`` with it, and ``distseq generate`` encodes a prompt and decodes what the
model writes with the codec of the run it loads. Byte 0 (NUL, which text does not hold) ends a document
at byte level; a tokenizer's own end-of-text token does with a tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from distseq.errors import ConfigError, DataFileError

TEXT_SUFFIXES = (".txt", ".text")
BYTES = "bytes"
# the names tokenizers give their end-of-document token, the first one present is used
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")


def is_text(path: str) -> bool:
    """Whether a data file is plain text (by its suffix), read through a codec."""
    return Path(path).suffix.lower() in TEXT_SUFFIXES


class ByteCodec:
    """Text as its UTF-8 bytes: ids 0..255, id 0 (NUL) ends a document."""

    name = BYTES
    vocab_size = 256
    eod_id: Optional[int] = 0

    def identity(self) -> dict:
        return {"codec": BYTES}

    def encode_file(self, data: bytes, path: str) -> np.ndarray:
        """A file's bytes as ids (n,) uint8; a NUL byte, which would end a document inside it, is an error."""
        ids = np.frombuffer(data, dtype=np.uint8)
        nul = np.flatnonzero(ids == 0)
        if len(nul):
            raise DataFileError(f"{path}: byte offset {int(nul[0])} is NUL (0), which ends a document in byte-level "
                                f"text: this is not a text file (give its tokens as a .bin file instead)")
        return ids

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Ids as text; bytes that are not UTF-8 (a character cut by the end of generation) show as U+FFFD."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class TokenizerCodec:
    """Text through a ``tokenizer.json``: its vocabulary (added tokens included) and end-of-text token."""

    def __init__(self, path: str, eod_id: Optional[int] = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("--tokenizer", "needs the tokenizers package: pip install tokenizers") from None
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # a missing file, not JSON, not a tokenizer: one line naming it
            reason = "no such file" if not Path(path).is_file() else str(error).splitlines()[0]
            raise ConfigError("--tokenizer", f"{path}: cannot be read as a tokenizer.json ({reason})") from None
        self.path, self.name = str(path), str(path)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        found = (self.tokenizer.token_to_id(token) for token in END_OF_TEXT)
        self.eod_id = eod_id if eod_id is not None else next((i for i in found if i is not None), None)

    def identity(self) -> dict:
        from distseq.fsio import sha256_file

        return {"codec": "tokenizer", "sha256": sha256_file(self.path), "vocab_size": self.vocab_size}

    def encode_file(self, data: bytes, path: str) -> np.ndarray:
        """A UTF-8 file's ids (n,) uint32, encoded a line at a time (so memory stays bounded by a batch of lines;
        the pre-tokenizers of common tokenizers split at whitespace anyway)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataFileError(f"{path}: byte offset {error.start} is not UTF-8 ({error.reason}); a tokenizer reads "
                                f"UTF-8 text") from None
        lines = text.splitlines(keepends=True)
        parts = []
        for start in range(0, len(lines), 8192):
            encoded = self.tokenizer.encode_batch(lines[start:start + 8192], add_special_tokens=False)
            parts += [np.asarray(e.ids, dtype=np.uint32) for e in encoded]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)

    def encode(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_codec(tokenizer: Optional[str], eod_id: Optional[int] = None):
    """The codec of ``--tokenizer``: bytes when absent (or ``bytes``), else the tokenizer.json it names."""
    if tokenizer is None or tokenizer == BYTES:
        return ByteCodec()
    return TokenizerCodec(tokenizer, eod_id)


def run_codec(data_files: Optional[str], tokenizer: Optional[str]):
    """The codec a run's text was read with (None when its data is not text): what ``generate`` decodes with."""
    if not data_files:
        return None
    parts = [p.strip() for p in data_files.split(",") if p.strip()]
    return load_codec(tokenizer) if parts and all(is_text(p) for p in parts) else None
