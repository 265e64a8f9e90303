"""The stop signals: one table of what each means, and every handler distseq installs for them.

``STOP_SIGNALS`` maps each signal that stops a run to the exit code a run stopped by it ends with: 130
for an interrupt (SIGINT, Ctrl-C), 143 for a request to stop (SIGTERM; SIGUSR1, which SLURM sends
before a time limit; SIGHUP, a lost terminal or a batch system's notice), which schedulers read as
"stopped on request, may be requeued". Everything else reads this table: the command line's start-up
handler (``install``), the training loop's (``StopSignals``), DataLoader workers (``ignore_in_worker``)
and ``distseq launch`` (which signals it passes on to the ranks, and what it exits with).

A signal that the process inherited as ignored (``nohup``, a background job of a non-interactive
shell) stays ignored everywhere. Python runs these handlers on the main thread between two bytecodes, so
a main thread blocked inside one call of torch's C++ (a store waiting for a peer that never comes, gloo's
connectFullMesh, a collective whose peer hangs) would never run them: ``Unheard`` exits for it. Standard
library only, so this runs before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

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
    traceback before the checkpoint is saved. The main process ends its workers when it stops. A forked
    worker also stops writing signals to its parent's ``Unheard`` descriptor."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(ValueError):  # ValueError: not the worker's main thread
        signal.set_wakeup_fd(-1)


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
        self.exiting = threading.Lock()

    def training_started(self) -> None:
        self.started = True

    def __call__(self, signum, frame, blocked_s: float = 0.0) -> None:
        """One line, then exit; ``blocked_s``: called by ``Unheard`` for a main thread that could not hear
        the signal for that long (inside torch's C++, most likely waiting for another process)."""
        name = signal_name(signum)
        blocked = f"blocked for {blocked_s:g} s inside torch, most likely waiting for another process"
        if self.started:
            line = (f"distseq: {name}: exiting now without saving: {blocked} (the newest complete checkpoint is "
                    f"intact)" if blocked_s else f"distseq: {name}: exiting now (the newest complete checkpoint is "
                                                 f"intact)")
        else:
            line = f"distseq: {name} during start-up: stopped before training; nothing was saved" + (
                f" ({blocked})" if blocked_s else "")
        # one line, whichever thread comes first (the other waits for the exit); a second signal on the thread
        # that is exiting gives up waiting for itself and returns to the line it interrupted
        if not self.exiting.acquire(timeout=1.0):
            return
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        os._exit(exit_code(signum))


class Unheard:
    """A stop signal that the main thread cannot hear, acted on by a thread of its own.

    Python's C-level handler writes each signal's number to a wakeup descriptor (``signal.set_wakeup_fd``)
    whatever the main thread is doing; this thread reads it. When none of the table's handlers ran on the
    main thread within ``patience_s()`` of the signal, the main thread is blocked inside one call (a
    store's connect, gloo's connectFullMesh, a collective waiting for a peer that hangs, until
    --dist-timeout-s ends it): the process exits as ``ExitNow`` does, one line and the table's code. Only
    the processes that train or evaluate watch (the launcher's own handlers are torch's); a handler of the
    table that ran at any time after the signal could have arrived counts as heard."""

    def __init__(self, exit_now: "ExitNow"):
        self.exit_now = exit_now
        self.changed = threading.Condition()
        self.heard_at = float("-inf")  # when a handler of the table last ran on the main thread
        self.watching = False

    def hear(self) -> None:
        """A handler of the table ran (on the main thread, which is therefore not blocked)."""
        with self.changed:
            self.heard_at = time.monotonic()
            self.changed.notify_all()

    def patience_s(self) -> float:
        """2 s during start-up, where the handlers stop at once and nothing is saved; in training, half the
        launcher's shutdown timeout (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, torch's default 30 s, ``distseq
        launch``'s 300 s): the rank ends with its own line before the launcher's SIGKILL, and a call that
        is only slow (a long write, a GPU step that the host waits for) gets time to return and save."""
        if not self.exit_now.started:
            return 2.0
        try:
            return max(1.0, float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")) / 2)
        except ValueError:  # torch's launcher would have refused it: not launched by torch
            return 15.0

    def watch(self) -> None:
        """Start watching (from the main thread, once); a no-op anywhere else."""
        if self.watching or threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read,), name="distseq-unheard-signals", daemon=True).start()
        self.watching = True

    def _watch(self, read: int) -> None:
        stops = {int(sig) for sig in STOP_SIGNALS}
        while True:
            since = time.monotonic()  # every signal read next arrived after this
            arrived = [signum for signum in os.read(read, 64) if signum in stops]
            if not arrived:
                continue
            patience = self.patience_s()
            with self.changed:
                if self.changed.wait_for(lambda: self.heard_at > since, timeout=patience):
                    continue
            self.exit_now(arrived[0], None, blocked_s=patience)


_exit_now = ExitNow()
_unheard = Unheard(_exit_now)
_installed: list = []


def install() -> None:
    """One-line exits for the stop signals, except those inherited as ignored."""
    for sig in catchable():
        if sig not in _installed:
            signal.signal(sig, _exit_now)
            _installed.append(sig)


def watch_unheard() -> None:
    """In a process that trains or evaluates: exit on a stop signal its main thread cannot hear (``Unheard``).
    Only where the command line installed its handlers: a test's or a notebook's interpreter is never exited."""
    if _installed:
        _unheard.watch()


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
    the loop runs it only sets ``received``; every rank agrees on it at a step boundary (a step later: the
    loop reads the agreed flags one step late, ``training/agreement.py``), saves and
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
        _unheard.hear()
        name = signal_name(signum)
        if not self.in_loop:
            raise StartupStopped(f"{name} during start-up: stopped before training; nothing was saved",
                                 exit_code(signum))
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            print("distseq: second SIGINT: exiting now without saving (the newest complete checkpoint is intact)",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.received = self.received or signum
