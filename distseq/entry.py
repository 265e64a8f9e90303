"""The ``distseq`` command's process-wide signal handling: one line and an exit, never a traceback.

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
_stage = {"name": "start-up"}  # "start-up" until a training loop runs, then "after training started"
_installed = []


def _exit_now(signum, frame) -> None:
    name = signal.Signals(signum).name
    code = 130 if signum == signal.SIGINT else 143
    if _stage["name"] == "start-up":
        line = f"distseq: {name} during start-up: stopped before training; nothing was saved"
    else:
        line = f"distseq: {name}: exiting now (the newest complete checkpoint is intact)"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(code)


def install() -> None:
    """One-line exits for the stop signals, except those inherited as ignored."""
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _exit_now)
            _installed.append(sig)


def training_started() -> None:
    """From now on an exit outside the loop is not 'during start-up'."""
    _stage["name"] = "after training started"


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


def main() -> int:
    """The ``distseq`` console script."""
    install()  # before importing the command line, which imports torch
    from .cli import main as cli_main

    return run(cli_main)
