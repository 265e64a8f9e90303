"""The stop signals: one table of what each means, and every handler distseq installs for them.

``STOP_SIGNALS`` maps each signal that stops a run to the exit code a run stopped by it ends with: 130
for an interrupt (SIGINT, Ctrl-C), 143 for a request to stop (SIGTERM; SIGUSR1, which SLURM sends
before a time limit; SIGHUP, a lost terminal or a batch system's notice), which schedulers read as
"stopped on request, may be requeued". Everything else reads this table: the command line's start-up
handler (``install``), the training loop's (``StopSignals``), DataLoader workers (``ignore_in_worker``)
and ``distseq launch`` (which signals it passes on to the ranks, and what it exits with).

A signal that the process inherited as ignored (``nohup``, a background job of a non-interactive
shell) stays ignored everywhere. Standard library only, so this runs before anything heavy is imported.
"""

from __future__ import annotations

import os
import signal
import sys

from distseq.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, StartupStopped

STOP_SIGNALS = {
    signal.SIGINT: EXIT_INTERRUPTED,
    signal.SIGTERM: EXIT_PREEMPTED,
    signal.SIGUSR1: EXIT_PREEMPTED,
    signal.SIGHUP: EXIT_PREEMPTED,
}


def exit_code(signum: int) -> int:
    """The exit code of a run stopped by ``signum`` (130 for SIGINT, 143 for the others)."""
    return STOP_SIGNALS[signal.Signals(signum)]


def signal_name(signum: int) -> str:
    return signal.Signals(int(signum)).name


def status(signum: int) -> str:
    """What summary.json calls a run stopped by ``signum``."""
    return "interrupted" if exit_code(signum) == EXIT_INTERRUPTED else "preempted"


def names() -> str:
    """``SIGINT,SIGTERM,SIGUSR1,SIGHUP``: the table as torch elastic's ``--signals-to-handle`` takes it."""
    return ",".join(sig.name for sig in STOP_SIGNALS)


def catchable() -> list:
    """The stop signals this process did not inherit as ignored."""
    return [sig for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]


def ignore_in_worker(worker_id: int = 0) -> None:
    """In a DataLoader worker: a stop signal sent to the whole process group (SLURM's preemption, kill -TERM
    -PGID, Ctrl-C) is the main process's to act on; a worker that died of it would end the run with a
    traceback before the checkpoint is saved. The main process ends its workers when it stops."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# --- the command line: one line and an exit, never a traceback ----------------------------------------
class ExitNow:
    """The command line's handler outside the training loop: one line, then exit with the table's code.

    Importing torch and building the run take seconds; a signal in that time must not end in a 40-line
    traceback from inside an import. Before the loop nothing was written that an exit could leave
    half-done, and after it the checkpoints are complete by construction. The loop's own handler
    (``StopSignals``) calls ``training_started()`` on the handler it replaces, after which an exit is no
    longer "during start-up"."""

    def __init__(self):
        self.started = False

    def training_started(self) -> None:
        self.started = True

    def __call__(self, signum, frame) -> None:
        name = signal_name(signum)
        if self.started:
            line = f"distseq: {name}: exiting now (the newest complete checkpoint is intact)"
        else:
            line = f"distseq: {name} during start-up: stopped before training; nothing was saved"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        os._exit(exit_code(signum))


_exit_now = ExitNow()
_installed: list = []


def install() -> None:
    """One-line exits for the stop signals, except those inherited as ignored."""
    for sig in catchable():
        if sig not in _installed:
            signal.signal(sig, _exit_now)
            _installed.append(sig)


def run(cli_main) -> int:
    """Run the command line with these handlers; exit with its code, deaf to signals while exiting (a
    late Ctrl-C cannot turn a clean exit into a kill)."""
    install()
    try:
        return cli_main()
    finally:
        for sig in _installed:
            signal.signal(sig, signal.SIG_IGN)


# --- the training loop: save at the next step boundary ----------------------------------------------
class StopSignals:
    """The stop signals from start-up to the end of a run.

    During start-up a signal stops the process at once (``StartupStopped``: nothing was saved yet). Once
    the loop runs it only sets ``received``; every rank agrees on it at the next step boundary, saves and
    exits with the table's code. A second SIGINT exits at once: checkpoints are written atomically, so
    the newest complete one stays intact.
    """

    def __init__(self):
        self.received = 0  # the first signal's number, 0 while none arrived
        self.in_loop = False
        self._previous = {}

    def begin_loop(self) -> None:
        """From here a signal is acted on at the next step boundary (saved), not at once; the handlers
        this one replaced (the command line's ``ExitNow``) learn that training has started."""
        self.in_loop = True
        for handler in self._previous.values():
            getattr(handler, "training_started", lambda: None)()

    def __enter__(self) -> "StopSignals":
        for sig in catchable():
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal_name(signum)
        if not self.in_loop:
            raise StartupStopped(f"{name} during start-up: stopped before training; nothing was saved",
                                 exit_code(signum))
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            print("distseq: second SIGINT: exiting now without saving (the newest complete checkpoint is intact)",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.received = self.received or signum
