"""Text as token ids: its bytes (vocabulary 256), or a user's own ``tokenizer.json`` (the ``tokenizers``
library, read from the file given: nothing is ever downloaded).

A codec turns text into ids and back; the language-modelling index (``data/tokens.py``) encodes the
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

    def __init__(self, path: str):
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
        self.eod_id = next((i for i in found if i is not None), None)

    def identity(self) -> dict:
        from distseq.fsio import sha256_file

        return {"codec": "tokenizer", "sha256": sha256_file(self.path)}

    def encode_file(self, data: bytes, path: str) -> np.ndarray:
        """A UTF-8 file's ids (n,) uint32: the whole text encoded at once, exactly as ``encode`` (a prompt) and the
        tokenizer itself would (pre-tokenizers may join across lines: cutting the text would change its ids)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataFileError(f"{path}: byte offset {error.start} is not UTF-8 ({error.reason}); a tokenizer reads "
                                f"UTF-8 text") from None
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_codec(tokenizer: Optional[str]):
    """The codec of ``--tokenizer``: bytes when absent (or ``bytes``), else the tokenizer.json it names."""
    if tokenizer is None or tokenizer == BYTES:
        return ByteCodec()
    return TokenizerCodec(tokenizer)


def run_codec(tokenizer: Optional[str]):
    """The codec a run's text was read with, from its recorded ``--tokenizer`` (``bytes`` or a tokenizer.json's
    absolute path, as validation resolves it for text); None when its data were token ids."""
    return None if tokenizer is None else load_codec(tokenizer)
