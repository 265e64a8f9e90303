"""Stuck ranks: when a collective fails (a peer froze past --dist-timeout-s, or died), each surviving rank
writes its Python stacks to ``RUN/hang-rank{N}.txt`` and the one-line error names the file.

The file holds where this rank waited (the frames of the call that failed: which collective, called
from which line of the step) and every thread's stack at that moment (faulthandler: the data
loader's pin thread, a background checkpoint's thread, ...). A frozen rank writes nothing, so the
ranks that did write, and the one that did not, point at the culprit together.
"""

from __future__ import annotations

import faulthandler
import os
import time
import traceback
from pathlib import Path
from typing import Optional

from .errors import EXIT_FAILURE, DistseqError


class LostContactError(DistseqError, RuntimeError):
    """A collective failed: another process died or hung past --dist-timeout-s. Each rank says its own line."""

    exit_code = EXIT_FAILURE
    every_rank = True


class HangReport:
    """Where this rank's stacks go once its run directory exists (``RUN/hang-rank{N}.txt``)."""

    def __init__(self):
        self.run_dir: Optional[Path] = None
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    def attach(self, run_dir: Path, rank: int, world: int) -> None:
        self.run_dir, self.rank, self.world = run_dir, rank, world

    def lost_contact(self, error: BaseException) -> LostContactError:
        """The one-line error for a failed collective, after writing this rank's stacks where it can."""
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        message = f"lost contact with another process: {first}"
        if self.run_dir is not None:
            path = self.run_dir / f"hang-rank{self.rank}.txt"
            try:
                self.write(path, error)
                message += (f"; this rank's Python stacks are in {path} (each rank that waited wrote "
                            f"{self.run_dir}/hang-rank<N>.txt: a rank without one is the one that froze or died)")
            except OSError as problem:
                message += f"; its stacks could not be written to {path}: {problem.strerror or problem}"
        return LostContactError(message)

    def write(self, path: Path, error: BaseException) -> None:
        with open(path, "w") as f:
            f.write(f"distseq: rank {self.rank} of {self.world}, pid {os.getpid()}, at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: a collective failed\n\n"
                    f"Where this rank waited (the call that failed):\n")
            f.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
            f.write("\nEvery thread of this process now:\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.flush()
            os.fsync(f.fileno())
