"""Experiment trackers (``--log-with``), through accelerate: which ones, built how, started how.

TensorBoard goes by name: accelerate writes it to ``RUN/tensorboard/`` (the project name is its
directory) and ``start_tracking`` gives it ``purge_step``. Every other tracker is accelerate's own class,
built here under TRACKER_PROJECT and named after the run directory: by name, accelerate would give it
TensorBoard's directory as its project.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

from accelerate import Accelerator

from distseq.config import TrainConfig
from distseq.distributed.agree import main_decides
from distseq.errors import ConfigError

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


def start_tracking(accelerator: Accelerator, flat_config: dict, purge_step: Optional[int] = None) -> None:
    """Start --log-with's trackers (accelerate's ``init_trackers``), the flattened config as their
    hparams/params. TensorBoard under RUN/tensorboard: on resume, ``purge_step`` hides what a killed run
    logged after its last checkpoint, so the curves continue from the checkpoint without a fold. One that
    cannot start (a tracking URI it cannot use, say) is a ConfigError naming --log-with on every rank,
    not a traceback on the main process while the others train on."""
    kwargs = {"tensorboard": {"purge_step": purge_step}} if purge_step else {}

    def start() -> None:
        accelerator.init_trackers(TENSORBOARD_PROJECT, config=hparams(flat_config), init_kwargs=kwargs)

    def could_not_start(error: Exception) -> ConfigError:
        names = {tracker.name for tracker in accelerator.trackers}
        module = type(error).__module__.split(".")[0]
        lines = str(error).strip().splitlines() or [""]
        for tracker in accelerator.trackers:  # close what started; end_training must not fail on the rest
            with contextlib.suppress(Exception):
                tracker.finish()
        accelerator.trackers.clear()
        return ConfigError("--log-with", f"{module if module in names else 'a tracker'} could not start: "
                                         f"{type(error).__name__}: {lines[0]}")

    main_decides(accelerator, start, failure=could_not_start)
