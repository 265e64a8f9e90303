"""Other libraries' log messages that distseq says better itself.

``quiet_logger`` silences one logger for the length of one call. ``LauncherLogs`` keeps torch's launcher
(the elastic agent, its rendezvous, ``torch.distributed.run``) to its errors while ``distseq launch``
runs, and to nothing at all once distseq has written its final line: the agent's warnings ("Sending
process ... closing signal SIGTERM", "Received 15 death signal") repeat what that line says, and a
rendezvous keep-alive thread can log after it. The filter sits on the handlers torch's logging
installs, which every torch logger reaches, so loggers with levels of their own and modules imported
later are covered too.
"""

from __future__ import annotations

import contextlib
import logging

TORCH_LAUNCHER = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.CRITICAL):
    """Only messages of ``level`` and above from logger ``name`` (and its children) while inside."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


class LauncherLogs(logging.Filter):
    """Installed once per process (``install``): torch's launcher records below ERROR are dropped, and every
    one of them once ``close()`` was called (the launcher's own last line follows)."""

    def __init__(self):
        super().__init__()
        self.closed = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(TORCH_LAUNCHER):
            return True
        return not self.closed and record.levelno >= logging.ERROR

    def install(self) -> "LauncherLogs":
        for name in ("torch", "torch.distributed", ""):
            for handler in logging.getLogger(name).handlers:
                if self not in handler.filters:
                    handler.addFilter(self)
        return self

    def open(self) -> "LauncherLogs":
        """A launch begins (again, in this process): errors pass until ``close()``."""
        self.closed = False
        return self.install()

    def close(self) -> None:
        """From here nothing of torch's launcher is written, from any thread."""
        self.install()  # handlers added since (a module imported late) get the filter too
        self.closed = True

    def uninstall(self) -> None:
        for name in ("torch", "torch.distributed", ""):
            for handler in logging.getLogger(name).handlers:
                handler.removeFilter(self)
