"""Files: atomic writers, strict JSON, output paths checked before anything runs, the run-dir lock.

A reader never sees half a file: every file is written to a unique temporary sibling, fsynced and
renamed. JSON is strict (``NaN``/``Infinity`` are not JSON): a non-finite number is written as null
and listed under ``non_finite``. One run writes a run directory at a time: the main process holds an
exclusive ``flock`` on ``RUN/.lock``, which the OS releases when the process ends however it ends, so
a killed run never leaves a lock behind.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, List, Optional

from distseq.errors import ConfigError

LOCK_NAME = ".lock"


def write_text_atomically(path: Path, text: str) -> None:
    """Write through a unique temporary file, fsync and rename: a reader sees the old or the new file."""
    write_bytes_atomically(path, text.encode())


def write_bytes_atomically(path: Path, data: bytes) -> None:
    path = Path(os.path.realpath(path))  # a symlink's target is replaced, never the link
    if path.exists() and not path.is_file():  # /dev/null, a FIFO: write into it, never rename over it
        write_durably(path, data)
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # what open() would give: readers of a shared run dir can read it
    except OSError as error:
        raise named(error, path) from None
    try:
        write_durably(Path(tmp), data, name_as=path, fd=fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_durably(path: Path, data: bytes, name_as: Optional[Path] = None, fd: Optional[int] = None) -> None:
    """Write and fsync ``path`` (or the open ``fd``); an OSError (no space, no permission, read-only
    file system) names ``name_as`` or ``path``, which a failed write() or fsync() does not do itself."""
    try:
        with (os.fdopen(fd, "wb") if fd is not None else open(path, "wb")) as handle:
            handle.write(data)
            handle.flush()
            if fd is not None or path.is_file():  # a device or a pipe has nothing to sync
                os.fsync(handle.fileno())
    except OSError as error:
        raise named(error, name_as or path) from None


def named(error: OSError, path: Path) -> OSError:
    """``error`` naming ``path`` (the file the operator knows), with its errno and text."""
    return OSError(error.errno, error.strerror, str(path))


def strict_json(payload: Any) -> Any:
    """``payload`` with every non-finite float replaced by None; a dict gains ``non_finite``, the
    dotted keys that held one, so a reader knows the null is not a missing value."""
    found: List[str] = []

    def clean(value: Any, where: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            found.append(where or "value")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(payload, "")
    if found and isinstance(cleaned, dict):
        cleaned["non_finite"] = {"keys": found, "note": "these values were NaN or infinite; written as null"}
    return cleaned


def write_json(path: Path, payload: Any) -> None:
    write_text_atomically(path, json.dumps(strict_json(payload), indent=2, sort_keys=True, allow_nan=False) + "\n")


# --- output paths, checked before anything runs ---------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def _probe_write(option: str, directory: Path, target: Path) -> None:
    """Create and remove a temporary file in ``directory``: the only proof that a write will work
    (permissions, read-only mounts, /proc, root's exemptions)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".distseq-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(option, f"cannot write to {target}: {error.strerror or error}") from None


def _not_empty(option: str, path) -> Path:
    if not str(path).strip():
        raise ConfigError(option, "must not be empty")
    return Path(path)


def check_output_dir(option: str, path: str | os.PathLike) -> Path:
    """``path`` is, or can be created as, a writable directory. Creates nothing."""
    target = _not_empty(option, path)
    if target.exists() and not target.is_dir():
        raise ConfigError(option, f"{target} exists and is not a directory")
    existing = _nearest_existing(target)
    if not existing.is_dir():
        raise ConfigError(option, f"cannot create {target}: {existing} is not a directory")
    _probe_write(option, existing, target)
    return target


def check_output_file(option: str, path: str | os.PathLike) -> Path:
    """``path`` can be written as a file: not a directory, in an existing writable directory."""
    target = _not_empty(option, path)
    if target.is_dir():
        raise ConfigError(option, f"{target} is a directory; give a file name")
    if target.exists() and not target.is_file():  # /dev/null, a FIFO: written into, never replaced
        if not os.access(target, os.W_OK):
            raise ConfigError(option, f"cannot write to {target}: permission denied")
        return target
    if not target.parent.is_dir():
        raise ConfigError(option, f"cannot write {target}: directory {target.parent} does not exist")
    _probe_write(option, target.parent, target)
    return target


# --- one run per run directory --------------------------------------------------------------------
class RunDirLock:
    """An exclusive OS-level lock on ``RUN/.lock``, held by the main process while it writes the run.

    The lock file records the holder (host, pid, since) for the message a second writer gets; it is
    emptied on release so that a finished run directory does not name a stale holder.
    """

    def __init__(self, run_dir: Path, name: str = LOCK_NAME, what: str = "run", option: str = "--run-dir"):
        self.path = Path(run_dir) / name
        self.what, self.option = what, option  # the holder's kind and the option to change, for the message
        self._fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:  # moved aside (--overwrite) while we waited
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            raise ConfigError(self.option, f"{self.path.parent} is in use by another distseq {self.what} ({holder}); "
                                           f"wait for it to end or choose another {self.option}") from None
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
