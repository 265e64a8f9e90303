"""The command line's process-wide signal handling: one line and an exit, never a traceback.

Importing torch and building the run take seconds; a SIGINT, SIGTERM, SIGUSR1 or SIGHUP in that time
must not end in a 40-line traceback from inside an import. Outside the training loop (whose own
handlers, runtime.StopSignals, save first) these handlers print one line and exit at once: before
the loop nothing was written that an exit could leave half-done, and after it the checkpoints are
complete by construction. When the process ends, further signals are ignored so that a late Ctrl-C
cannot turn a clean exit into a kill. A signal the process inherited as ignored stays ignored.
Standard library only, so this runs before anything heavy is imported.
"""

import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
_installed = []


class ExitNow:
    """The handler: one line, then exit 130 (SIGINT) or 143. The training loop calls
    ``training_started()`` on the handler it replaces (duck-typed: no import of this module), after
    which an exit is no longer 'during start-up'."""

    def __init__(self):
        self.started = False

    def training_started(self) -> None:
        self.started = True

    def __call__(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.started:
            line = f"distseq: {name}: exiting now (the newest complete checkpoint is intact)"
        else:
            line = f"distseq: {name} during start-up: stopped before training; nothing was saved"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        os._exit(130 if signum == signal.SIGINT else 143)


_exit_now = ExitNow()


def install() -> None:
    """One-line exits for the stop signals, except those inherited as ignored."""
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN and sig not in _installed:
            signal.signal(sig, _exit_now)
            _installed.append(sig)


def _ignore_late_signals() -> None:
    for sig in _installed:
        signal.signal(sig, signal.SIG_IGN)


def run(cli_main) -> int:
    """Run the command line with these handlers; exit with its code, deaf to signals while exiting."""
    install()
    try:
        return cli_main()
    finally:
        _ignore_late_signals()
