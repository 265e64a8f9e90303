"""Writing a checkpoint atomically, on every rank's behalf, synchronously or in the background.

Every rank writes its own files into ``.tmp-step-N`` (its per-rank state files, then its part of the
weights and optimizer state through DCP), each file fsynced; the ranks agree that every write
succeeded; the main process then lists every file with its sha256 in ``meta.json`` and renames the
directory to ``step-N``. Older checkpoints are renamed out of the ``step-N`` namespace before they are
deleted, and only after the new one is complete. With ``asynchronous`` the DCP write runs in the
background and the main process completes the checkpoint in a thread once it is done.
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from accelerate import Accelerator
from torch.distributed.checkpoint.api import CheckpointException

from distseq.checkpoint.dcp import STATE, save_state
from distseq.checkpoint.format import _cause, _first_line, list_checkpoints, sha256_bytes, step_of
from distseq.distributed.agree import any_rank
from distseq.errors import RunIOError
from distseq.fsio import sha256_file, write_durably, write_json
from distseq.ops.failpoints import failpoint


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_failure(error: BaseException, where: Optional[Path] = None) -> str:
    """One line for a failed write, naming the file (or ``where`` the writer was writing)."""
    error = _cause(error)
    if isinstance(error, OSError):
        return f"cannot write {error.filename or where or 'a checkpoint file'}: {error.strerror or error}"
    return f"cannot write the checkpoint: {_first_line(error)}"


@dataclass
class PendingSave:
    """A checkpoint whose state is being written in the background (--async-checkpoint)."""

    step: int
    final: Path
    future: object  # DCP's Future of this rank's write
    thread: Optional[threading.Thread] = None  # main process: waits for the write, then completes the checkpoint
    problem: str = "its completion did not run"  # the main process's thread sets the outcome
    where: Optional[Path] = None  # the directory being written, for a failure that names no file

    def finish(self) -> str:
        """Wait for this rank's part; '' when the checkpoint is complete (main) or the write succeeded."""
        if self.thread is not None:
            self.thread.join()
            return self.problem
        return _written(self.future, self.where)


def _written(future, where: Optional[Path]) -> str:
    """Wait for DCP's Future of a background write; '' when it succeeded, else the one-line problem."""
    try:
        future.result()
    except (Exception, CheckpointException) as error:  # DCP reports every rank's failure to every rank
        return _io_failure(error, where)
    return ""


def write_checkpoint(accelerator: Accelerator, final: Path, *, model, optimizer, rank_files: Dict[str, bytes],
                     meta: dict, previous: Optional[Path] = None, keep_last: int = 0, group=None,
                     asynchronous: bool = False):
    """Write the checkpoint directory ``final`` (``.../step-N``) atomically on every rank's behalf; returns
    ``final``, or with ``asynchronous`` a PendingSave once the state is copied to host memory.

    ``rank_files``: this rank's own files (name -> bytes); ``meta``: meta.json's content (the main
    process adds every file's sha256). The weights and optimizer state go through
    ``torch.distributed.checkpoint`` into ``state/``: each rank writes its own file, in parallel. A
    failed write on any rank (no space, no permission, read-only file system) removes the temporary
    directory and raises RunIOError on every rank, naming the file and ``previous``, the newest
    complete checkpoint, which is untouched. ``keep_last``: retention after the rename (0 = keep all).
    """
    step = meta["step"]
    tmp = final.with_name(f".tmp-{final.name}")
    kept = f"kept {previous}" if previous else "no earlier checkpoint of this run exists"
    problem = ""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that died half-way
        try:
            tmp.mkdir(parents=True)
        except OSError as error:
            problem = _io_failure(error)
    if any_rank(accelerator, bool(problem)):
        raise RunIOError(f"{problem or 'the main process could not create the checkpoint directory'}; {kept}")

    try:
        for name, data in rank_files.items():
            write_durably(tmp / name, data)
            failpoint("checkpoint-partial", step)
    except OSError as error:
        problem = _io_failure(error)
    _agree_written(accelerator, problem, tmp, kept)  # before DCP's own collectives, which a failed rank would skip
    future = None
    try:
        future = save_state(tmp / STATE, model, optimizer, group, asynchronous)  # async: once copied to host
    except (Exception, CheckpointException) as error:  # OSError, or DCP's report of every rank's failure
        problem = _io_failure(error, tmp / STATE)
    _agree_written(accelerator, problem, tmp, kept)

    meta = copy.deepcopy(meta)  # the loop goes on changing its progress while a background save runs
    run_dir = final.parent.parent
    if asynchronous:
        pending = PendingSave(step, final, future, where=tmp / STATE)
        if accelerator.is_main_process:
            def complete_in_background() -> None:
                failpoint("checkpoint-background", step)
                try:
                    pending.problem = _written(future, tmp / STATE) or _complete(tmp, final, meta, rank_files)
                except BaseException as error:  # whatever ends this thread before the rename is the outcome
                    pending.problem = f"cannot complete the checkpoint: {_first_line(error)}"
                if not pending.problem and keep_last:
                    apply_retention(run_dir, step, keep_last)

            pending.thread = threading.Thread(target=complete_in_background, name=f"checkpoint-{step}")
            pending.thread.start()
        return pending
    if accelerator.is_main_process:
        problem = _complete(tmp, final, meta, rank_files)
    if any_rank(accelerator, bool(problem)):
        raise RunIOError(f"{problem or 'the main process could not complete the checkpoint'}; {kept}")
    if accelerator.is_main_process and keep_last:
        apply_retention(run_dir, step, keep_last)
    accelerator.wait_for_everyone()
    return final


def _agree_written(accelerator: Accelerator, problem: str, tmp: Path, kept: str) -> None:
    """Every rank learns whether any rank failed to write its part; then all raise the same RunIOError."""
    if any_rank(accelerator, bool(problem)):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        error = RunIOError(f"{problem or 'another process could not write its checkpoint files'}; {kept}")
        error.every_rank = bool(problem)  # the rank that met it names the file itself
        raise error


def _complete(tmp: Path, final: Path, meta: dict, files: Dict[str, bytes]) -> str:
    """Main process, once every rank's files are written: meta.json lists each file with its sha256,
    then the directory is fsynced and renamed to ``step-N``. '' on success, else the one-line problem
    (the temporary directory is removed)."""
    try:
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        hashes = {name: sha256_bytes(files[name]) if name in files else sha256_file(tmp / name) for name in names}
        write_json(tmp / "meta.json", {**meta, "sha256": hashes})
        _fsync_dir(tmp / STATE)
        _fsync_dir(tmp)
        failpoint("checkpoint-before-rename", meta["step"])
        _replace_dir(tmp, final)
        _fsync_dir(final.parent)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        return _io_failure(error)
    return ""


def apply_retention(run_dir: Path, step: int, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``step``. Each older one is first renamed out of
    the ``step-N`` namespace, so an interrupted deletion never leaves a partial ``step-N``."""
    older = [p for p in list_checkpoints(run_dir) if step_of(p) <= step][:-keep_last]
    for old in older:
        doomed = old.with_name(f".deleting-{old.name}")
        try:
            os.replace(old, doomed)
        except OSError:
            continue  # deleted by someone else, or not ours to delete: retention is best effort
        shutil.rmtree(doomed, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (the same step written again) is swapped out first."""
    if dst.exists():
        stale = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(dst, stale)
        os.replace(src, dst)
        shutil.rmtree(stale)
    else:
        os.replace(src, dst)


def clear_debris(run_dir: Path) -> None:
    """Remove what interrupted saves and deletions left (called under the run-dir lock, before a run):
    ``.tmp-step-N`` (an incomplete save) and ``.deleting-step-N`` (retention cut short). A
    ``.old-step-N`` is a complete checkpoint caught in the middle of being replaced: it goes back to
    ``step-N`` if that name is free, else it is the stale copy and is removed."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for path in root.iterdir():
        name = path.name
        if name.startswith(".old-step-") and not (root / name[len(".old-"):]).exists():
            os.replace(path, root / name[len(".old-"):])
        elif name.startswith((".tmp-step-", ".deleting-step-", ".old-step-")):
            shutil.rmtree(path, ignore_errors=True)
