"""Experiment trackers (``--log-with``), through accelerate: which ones, built how, started how.

TensorBoard goes by name: accelerate writes it to ``RUN/tensorboard/`` (the project name is its
directory) and ``start_tracking`` gives it ``purge_step``. Every other tracker is accelerate's own class,
built here under TRACKER_PROJECT and named after the run directory: by name, accelerate would give it
TensorBoard's directory as its project.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Optional

from accelerate import Accelerator

from distseq.config import TrainConfig
from distseq.distributed.agree import main_decides
from distseq.errors import ConfigError, StartupStopped

TENSORBOARD_PROJECT = "tensorboard"  # event files go to RUN/tensorboard/
TRACKER_PROJECT = "distseq"  # the MLflow experiment, W&B project, ... of every run (TensorBoard has none)
_RUN_NAME = {"mlflow": "run_name", "wandb": "name"}  # each tracker's keyword for the run's name


def trackers(cfg: TrainConfig) -> list:
    """``--log-with`` for accelerate's ``log_with``: names (TensorBoard) and tracker objects (the others)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    run_name = Path(cfg.train.run_dir).resolve().name
    out = []
    for name in cfg.trackers():
        if name == "tensorboard":
            out.append(name)
            continue
        tracker = LOGGER_TYPE_TO_CLASS[name]
        project = os.environ.get("WANDB_PROJECT", TRACKER_PROJECT) if name == "wandb" else TRACKER_PROJECT
        where = (cfg.train.run_dir,) if tracker.requires_logging_directory else ()
        out.append(tracker(project, *where, **({_RUN_NAME[name]: run_name} if name in _RUN_NAME else {})))
    return out


def hparams(flat_config: dict) -> dict:
    """TensorBoard hparams accept bool/int/float/str only."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat_config.items()}


def address(name: str) -> str:
    """Where tracker ``name`` sends its records, as its own settings say."""
    if name == "mlflow":
        import mlflow

        return mlflow.get_tracking_uri()
    if name == "wandb":
        return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    return "its configured server"


class _Late(BaseException):
    """The bound expired: a BaseException, so that no ``except Exception`` of a tracker's retry loop takes it."""


def import_libraries(accelerator: Accelerator) -> None:
    """Import each tracker's library (mlflow, wandb, ...) now, outside ``within``'s timer: a timer that fired
    inside an import on a loaded machine would leave the library half-imported for the next import."""
    import importlib

    for tracker in accelerator.log_with or []:
        name = getattr(tracker, "name", tracker)
        if isinstance(name, str) and name != "tensorboard":
            try:
                importlib.import_module(name)
            except Exception:  # not installed, or broken: init_trackers reports it in its own words
                pass


def within(seconds: float, work: Callable[[], None], late: Callable[[], Exception]) -> None:
    """``work()``, or ``late()`` raised once ``seconds`` have passed. In the main thread itself (a tracker
    keeps its active run per thread): a timer signal interrupts even a blocking socket call. Elsewhere no
    signal handler can be set, and where a timer runs already (someone else's: a test runner's limit) it is
    left alone: then ``work`` runs without this bound."""
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        work()
        return
    running = [True]

    def expire(signum, frame):
        if running[0]:  # not once work has ended: the timer is being disarmed
            raise _Late()

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        work()
    except _Late:
        raise late() from None
    finally:
        running[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def drop_trackers(accelerator: Accelerator, close: Callable[[object], bool]) -> None:
    """Forget the trackers after a failed start, closing those ``close`` says can be: end_training must not
    fail (or wait) on them."""
    for tracker in accelerator.trackers:
        if close(tracker):
            with contextlib.suppress(Exception):
                tracker.finish()
    accelerator.trackers.clear()


def start_tracking(accelerator: Accelerator, flat_config: dict, purge_step: Optional[int] = None,
                   timeout_s: float = 60.0) -> None:
    """Start --log-with's trackers (accelerate's ``init_trackers``), the flattened config as their
    hparams/params. TensorBoard under RUN/tensorboard: on resume, ``purge_step`` hides what a killed run
    logged after its last checkpoint, so the curves continue from the checkpoint without a fold. One that
    cannot start (a tracking URI it cannot use, say) or does not start within ``timeout_s`` (a server that
    does not answer) is a ConfigError naming --log-with on every rank, not a traceback or a silent wait on
    the main process while the others wait too."""
    kwargs = {"tensorboard": {"purge_step": purge_step}} if purge_step else {}

    def start() -> None:
        import_libraries(accelerator)  # the bound is on the server's answer: a slow import is no silence
        try:
            within(timeout_s, lambda: accelerator.init_trackers(TENSORBOARD_PROJECT, config=hparams(flat_config),
                                                                init_kwargs=kwargs), did_not_answer)
        except StartupStopped:
            # a stop signal inside a tracker's start leaves it half made (TensorBoard's without its writer), which
            # end_training would fail on; the others may be waiting on their server, so only TensorBoard is closed
            drop_trackers(accelerator, lambda tracker: tracker.name == "tensorboard")
            raise

    def did_not_answer() -> ConfigError:
        slow = [t.name for t in accelerator.trackers if t.name != "tensorboard"] or ["a tracker"]
        # closing the one that hangs would hang as well (its end_run calls the same server)
        drop_trackers(accelerator, lambda tracker: tracker.name == "tensorboard")
        return ConfigError("--log-with", f"{', '.join(slow)} did not start within {timeout_s:g} s (--tracker-timeout-s)"
                                         f": is {', '.join(address(name) for name in slow)} reachable?")

    def could_not_start(error: Exception) -> ConfigError:
        names = {tracker.name for tracker in accelerator.trackers}
        module = type(error).__module__.split(".")[0]
        lines = str(error).strip().splitlines() or [""]
        drop_trackers(accelerator, lambda tracker: True)
        return ConfigError("--log-with", f"{module if module in names else 'a tracker'} could not start: "
                                         f"{type(error).__name__}: {lines[0]}")

    main_decides(accelerator, start, failure=could_not_start)
