"""Whether a data file still holds the bytes it was indexed from, without reading it when ``stat`` can say.

A rewrite can put back a file's size and modification time (``touch -r``, ``cp -p``, ``os.utime`` with the
old nanoseconds); it cannot put back the inode change time, which every write and every utime set to now,
nor the inode of a file written anew. So a file is taken as unchanged without reading it only when all
four (size, mtime, ctime, inode) equal those recorded. When its size differs it changed; when anything
else differs, or is unknown (a record older than these fields), its sha256 decides: a touch, or a copy
that kept the bytes, is the same file, and the caller records the new stat (``FileStat.fields``).

File systems stamp times from a coarse clock (a few milliseconds; seconds on some), so a second write
just after the first may keep its ctime: a stat taken within RACY_NS of the file's last change is not
trusted (its ctime is recorded as unknown, so the next look hashes the bytes), as git treats a
"racily clean" index entry.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from distseq.fsio import sha256_file

RACY_NS = 2 * 10**9  # a stat this close to the file's last change may miss the next one
IDENTITY = ("size", "mtime_ns", "ctime_ns", "ino")  # the fields a record keeps


@dataclass(frozen=True)
class FileStat:
    """A file's identity as ``stat`` tells it (equality ignores ``settled``)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    settled: bool = field(compare=False)  # its last change was RACY_NS old when the stat was taken

    @classmethod
    def of(cls, path: str) -> "FileStat":
        """``path``'s stat now; OSError when it is gone."""
        stat = os.stat(path)
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino,
                   settled=time.time_ns() - stat.st_ctime_ns >= RACY_NS)

    def fields(self) -> dict:
        """What a record keeps: the ctime is unknown (None) while the stat is not settled."""
        return {"size": self.size, "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns if self.settled else None,
                "ino": self.ino}

    def vouches_for(self, recorded: dict) -> bool:
        """The bytes are those ``recorded`` without reading them: every field recorded, known and equal."""
        return all(recorded.get(name) == getattr(self, name) for name in IDENTITY)


_HASHED: Dict[Tuple[str, FileStat], str] = {}  # sha256 of settled stats: a start checks once, not per look


def content_sha256(path: str, stat: FileStat) -> str:
    """The sha256 of ``path``'s bytes (read once per process per settled stat)."""
    key = (os.path.abspath(path), stat)
    if key in _HASHED:
        return _HASHED[key]
    sha = sha256_file(path)
    if stat.settled:  # another write would move the ctime: the stat names these bytes
        _HASHED[key] = sha
    return sha


def difference(path: str, recorded: dict) -> Tuple[Optional[str], FileStat]:
    """How ``path`` differs from ``recorded`` (its size, or "was modified"), None when it does not; and its
    stat now. ``recorded`` holds IDENTITY's fields (missing or None: unknown) and ``sha256`` (None: a record
    of a file with a bad row, checked by stat alone). OSError when the file is gone."""
    now = FileStat.of(path)
    if recorded.get("size") != now.size:
        return f"changed size ({recorded.get('size')} -> {now.size} bytes)", now
    if now.vouches_for(recorded):
        return None, now
    sha = recorded.get("sha256")
    return (None if sha is not None and content_sha256(path, now) == sha else "was modified"), now
