"""Helpers shared by the tests: run distseq as real processes, read what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distseq.distributed.accelerator import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["--max-steps", "6", "--log-every", "2", "--eval-every", "3", "--eval-size", "256", "--no-progress"]


def cpu_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_distseq(args, *, timeout: float = 240, env=None) -> subprocess.CompletedProcess:
    """``python -m distseq.cli ARGS`` in one process."""
    return subprocess.run(
        [sys.executable, "-m", "distseq.cli", *args], capture_output=True, text=True, timeout=timeout,
        env=env or cpu_env(), cwd=REPO,
    )


def run_main(args, capsys) -> subprocess.CompletedProcess:
    """``distseq ARGS`` in this process (no interpreter start: seconds faster than ``run_distseq``)."""
    from distseq.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def accelerate_launch(launch_args, args, *, timeout: float = 240) -> subprocess.CompletedProcess:
    """``accelerate launch LAUNCH_ARGS -m distseq.cli ARGS``: real processes, gloo on loopback."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", "distseq.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cpu_env(), cwd=REPO)


def two_process_args() -> list:
    return ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def checkpoint_weights(checkpoint_dir) -> dict:
    """The whole weights of a checkpoint (``{name: tensor}``, the names of an export's model.safetensors),
    read from its ``state/`` as torch.distributed.checkpoint wrote it, whatever the sharding."""
    from distseq.checkpoint.dcp import whole_weights

    return whole_weights(Path(checkpoint_dir) / "state")


def checkpoint_training_state(checkpoint_dir):
    """``(model, optimizer)`` as a checkpoint saved them: the model its meta.json's config builds and a
    fresh AdamW (lr 1, no weight decay) under a schedule (which adds ``initial_lr``, as training's does),
    both filled from its ``state/`` by distseq's own loading, so the optimizer's param_groups and moments
    are the saved ones. DCP loads the keys the fresh ones hold: these are all that training saves."""
    import torch

    from distseq.inference.export import config_of
    from distseq.models import build_model
    from distseq.registry import TASKS
    from distseq.checkpoint.dcp import load_state

    meta = json.loads((Path(checkpoint_dir) / "meta.json").read_text())
    cfg = config_of(meta["config"])
    model = build_model(cfg.model, TASKS[cfg.data.task], cfg.task_spec())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.0)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    load_state(Path(checkpoint_dir) / "state", model, optimizer, None)
    return model, optimizer


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def scalars(run_dir: Path) -> dict:
    """``{tag: [(step, value), ...]}`` read back from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for directory in sorted({p.parent for p in (Path(run_dir) / "tensorboard").rglob("events.out.tfevents*")}):
        acc = EventAccumulator(str(directory))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def pytest_collection_modifyitems(items):
    """Every test that starts real processes is slow too: the fast tier runs in one process."""
    for item in items:
        if item.get_closest_marker("multiproc"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The --data-files indexes of the whole session go to one fresh cache, never the user's."""
    path = tmp_path_factory.mktemp("distseq-cache")
    os.environ["DISTSEQ_CACHE"] = str(path)
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def register():
    """Register a task for one test and remove it afterwards, so no other test sees it."""
    import distseq
    from distseq.registry import TASKS

    names = []

    def add(name, obj):
        distseq.register_task(name)(obj)
        names.append(name)
        return name

    yield add
    for name in names:
        TASKS._items.pop(name, None)
