"""The ``distseq`` command's entry point: signals before a run's own handling begins are one line
and an exit, never a traceback.

Importing torch and building the run take seconds; a SIGINT, SIGTERM, SIGUSR1 or SIGHUP in that time
must not end in a 40-line traceback from inside an import. Until the training loop installs its own
handlers (runtime.StopSignals), these print one line and exit at once: nothing was written yet that
an exit could leave half-done. A signal the process inherited as ignored stays ignored. Standard
library only, so this runs before anything heavy is imported.
"""

import os
import signal
import sys

EARLY_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def _exit_now(signum, frame) -> None:
    name = signal.Signals(signum).name
    code = 130 if signum == signal.SIGINT else 143
    sys.stderr.write(f"distseq: {name} during start-up: stopped before training; nothing was saved\n")
    sys.stderr.flush()
    os._exit(code)


def stop_quietly_until_handled() -> None:
    for sig in EARLY_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _exit_now)


def main() -> int:
    stop_quietly_until_handled()
    from .cli import main as cli_main

    return cli_main()
