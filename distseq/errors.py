"""One hierarchy of errors; each class carries the exit code the command line ends with.

Every error distseq raises on purpose is a ``DistseqError`` whose message is one line for the
operator. The CLI maps them to exit codes in one place (``exit_code``): 2 for a bad input (fix the
command and run again), 1 for a run that failed, 130 for an interrupt, 143 for a preemption
(128 + SIGTERM: what schedulers expect from a job that stopped on request and may be requeued).
This module imports nothing from distseq, so every other module may use it.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_PREEMPTED = 143  # 128 + SIGTERM


class DistseqError(Exception):
    """A condition distseq reports in one line. ``every_rank``: each rank prints its own message (the
    ranks met different things, e.g. the one rank that read a bad row); otherwise the main process
    speaks for all."""

    exit_code = EXIT_FAILURE
    every_rank = False


class ConfigError(DistseqError, ValueError):
    """A bad configuration value. ``option`` is the command-line spelling of the field."""

    exit_code = EXIT_USAGE

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message

    def __reduce__(self):  # broadcast between ranks as the same error
        return type(self), (self.option, self.message)


class CheckpointError(DistseqError, ValueError):
    """A checkpoint that cannot be used; the message says which and why."""

    exit_code = EXIT_USAGE


class DataFileError(DistseqError, ValueError):
    """A row of the user's files that cannot be used; the message names the file and the row."""

    exit_code = EXIT_USAGE
    every_rank = True


class DataAccountingError(DistseqError, RuntimeError):
    """The samples consumed across ranks are not exactly the expected range."""


class NonFiniteError(DistseqError, RuntimeError):
    """A NaN/inf loss or gradient under --on-nonfinite stop, or too many skipped steps under skip."""


class TaskContractError(DistseqError):
    """A task breaks the stream contract (``distseq check-task``); the message names the property."""


class RunIOError(DistseqError, OSError):
    """Writing the run's files failed (no space, no permission, read-only file system): the message
    names the file and says what was kept."""


class LostContactError(DistseqError, RuntimeError):
    """A collective failed in training: another process died or hung past --dist-timeout-s. Each rank says
    its own line, naming the file with its Python stacks (hangs.py)."""

    every_rank = True


class StartupStopped(BaseException):
    """A stop signal during start-up: nothing was saved. A BaseException, like KeyboardInterrupt, so
    that no ``except Exception`` on the way (a tracker's start, a file check) can turn it into another
    error; the CLI prints its one line and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(DistseqError):
    """The run stopped on a signal after every rank saved at ``step``."""

    def __init__(self, message: str, exit_code: int, step: int | None = None):
        super().__init__(message)
        self.exit_code, self.step = exit_code, step

    def __reduce__(self):
        return type(self), (str(self), self.exit_code, self.step)


def describe(error: BaseException) -> str:
    """``TypeError: its first line``: someone else's exception (a plugin's, a library's) in one line."""
    message = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
