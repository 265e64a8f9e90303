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

from distseq.errors import LostContactError


class HangReport:
    """Where this rank's stacks go once its run directory exists (``RUN/hang-rank{N}.txt``), on several ranks."""

    def __init__(self):
        self.run_dir: Optional[Path] = None
        self.rank, self.world = 0, 1

    def attach(self, run_dir: Path, rank: int, world: int) -> None:
        """From here a failed collective is reported with stacks. This rank's file from an earlier attempt (an
        in-job restart, a resumed run) becomes ``hang-rank{N}.previous.txt``: a file present means this
        attempt's rank waited, and a missing one still names the rank that froze."""
        self.run_dir, self.rank, self.world = run_dir, rank, world
        path = self.path
        if path.exists():
            try:
                os.replace(path, path.with_name(f"hang-rank{rank}.previous.txt"))
            except OSError:
                pass  # a read-only leftover: the new report overwrites it or says it could not

    @property
    def path(self) -> Path:
        return self.run_dir / f"hang-rank{self.rank}.txt"

    @property
    def attached(self) -> bool:
        """A run directory exists and there are other ranks to lose."""
        return self.run_dir is not None and self.world > 1

    def lost_contact(self, error: BaseException) -> LostContactError:
        """The one-line error for a failed collective, after writing this rank's stacks where it can."""
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        message = f"lost contact with another process: {first}"
        if self.run_dir is not None:
            path = self.path
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
