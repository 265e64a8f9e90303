"""The run directory of a training run: checked, created, locked, and never mixed with an earlier run.

The main process prepares it and every rank learns the outcome (one broadcast), so a refusal is the
same one-line error on every rank instead of a hang. Rules:

- one writer at a time: the main process holds ``RUN/.lock`` (an OS lock) until the run ends;
- a fresh start (``--resume never``) into a directory that holds an earlier run is refused, unless
  ``--overwrite``, which first moves the whole directory aside to ``RUN.replaced-<time>`` in one
  atomic rename (nothing is deleted);
- ``--resume PATH`` into a directory whose checkpoints go past PATH is refused: the later ones belong
  to another history, and ``--resume auto`` would pick them up afterwards.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional

from accelerate import Accelerator

from distseq.checkpoint.format import list_checkpoints, step_of
from distseq.checkpoint.writer import clear_debris
from distseq.config import TrainConfig
from distseq.distributed.agree import main_decides
from distseq.errors import ConfigError
from distseq.fsio import LOCK_NAME, RunDirLock, check_output_dir


def earlier_run(run_dir: Path) -> List[str]:
    """What an earlier run left in ``run_dir`` (names of its entries), empty when there is none."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)


def _step_in_meta(checkpoint: Path) -> Optional[int]:
    """The step a checkpoint directory says it holds (verified later, when it is loaded)."""
    try:
        step = json.loads((checkpoint / "meta.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _aside_name(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}"), 1
    while aside.exists():
        aside, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}"), n + 1
    return aside


class RunDir:
    """The prepared run directory; ``moved_aside`` is where --overwrite put the earlier run."""

    def __init__(self, path: Path, lock: Optional[RunDirLock], moved_aside: Optional[Path]):
        self.path, self.lock, self.moved_aside = path, lock, moved_aside

    def close(self) -> None:
        if self.lock:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prepare(cfg: TrainConfig) -> RunDir:
    """On the main process: check, create and lock the run directory; apply --overwrite."""
    c = cfg.checkpoint
    path = Path(os.path.abspath(check_output_dir("--run-dir", cfg.train.run_dir)))  # '.' has no name to move
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("--run-dir", f"cannot create {path}: {error.strerror}") from None
    lock = RunDirLock(path).acquire()
    try:
        found = earlier_run(path)
        if found and c.resume == "never" and not c.overwrite:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise ConfigError("--resume", f"never: {path} holds an earlier run ({shown}); use a new --run-dir, or add "
                                          f"--overwrite to move it aside first")
        if found and c.overwrite:
            aside = _aside_name(path)
            os.rename(path, aside)  # one atomic step: the earlier run is whole in one place or the other
            path.mkdir()
            moved = RunDir(path, RunDirLock(path), aside)
            try:
                moved.lock.acquire()
            finally:
                lock.release()  # the old lock file moved aside with the earlier run
            return moved
        if c.resume not in ("auto", "never"):
            wanted = _step_in_meta(Path(c.resume))
            later = [p for p in list_checkpoints(path) if wanted is not None and step_of(p) > wanted
                     and p.resolve() != Path(c.resume).resolve()]
            if later:
                raise ConfigError("--resume", f"{path} holds checkpoints past {c.resume} (newest {later[-1].name}) "
                                              f"from another history; resume into a new --run-dir")
        clear_debris(path)
    except BaseException:
        lock.release()
        raise
    return RunDir(path, lock, None)


def open_run_dir(accelerator: Accelerator, cfg: TrainConfig) -> RunDir:
    """Prepare the run directory on the main process; every rank raises the same error if that fails."""

    def cannot_prepare(error: Exception) -> ConfigError:  # OSError and anything unforeseen: one line, not a hang
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        return ConfigError("--run-dir", f"cannot prepare {cfg.train.run_dir}: {reason}")

    prepared = main_decides(accelerator, lambda: _prepare(cfg), share=False, failure=cannot_prepare)
    return prepared or RunDir(Path(cfg.train.run_dir), None, None)
