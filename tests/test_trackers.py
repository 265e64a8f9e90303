"""--log-with: accelerate's experiment trackers. MLflow (mlflow-skinny, a local file store, offline) is
proven end to end against TensorBoard; a bad name is one line; the default writes TensorBoard only."""

import socket
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, assert_ok, cpu_env, run_distseq, run_main, scalars

from distseq.config import TrainConfig

FAST = ["train", *TINY, "--global-batch-size", "32", "--hidden-size", "16", "--checkpoint-every", "0"]
LOGGED = [2, 4, 6]  # --max-steps 6 --log-every 2


@pytest.fixture
def cli(capsys):
    return lambda args: run_main(args, capsys)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> Path:
    """A local MLflow file store under tmp: nothing leaves the machine. MLflow 3 keeps the file store
    in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE is set."""
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_NESTED_RUN"):
        monkeypatch.delenv(name, raising=False)
    return store


def read_mlflow_run(store: Path) -> dict:
    """The one run of a local MLflow file store, read from the files themselves (not through mlflow)."""
    runs = [meta.parent for meta in store.glob("*/*/meta.yaml")]
    assert len(runs) == 1, f"expected one MLflow run in {store}, found {runs}"
    run = runs[0]

    def files(name):
        return {f.relative_to(run / name).as_posix(): f.read_text() for f in (run / name).rglob("*") if f.is_file()}

    metrics = {}
    for key, text in files("metrics").items():  # one "timestamp value step" line per logged value
        metrics[key] = [(int(step), float(value)) for _, value, step in (line.split() for line in text.splitlines())]
    return {"experiment": yaml.safe_load((run.parent / "meta.yaml").read_text())["name"],
            "run_name": files("tags")["mlflow.runName"], "params": files("params"), "metrics": metrics}


def test_mlflow_records_what_tensorboard_records(tmp_path, cli, mlflow_store):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'distseq[trackers]'")
    run_dir = tmp_path / "run"
    assert_ok(cli([*FAST, "--run-dir", run_dir, "--log-with", "tensorboard,mlflow"]))

    board, mlflow = scalars(run_dir), read_mlflow_run(mlflow_store)
    assert mlflow["experiment"] == "distseq" and mlflow["run_name"] == "run"
    assert [step for step, _ in mlflow["metrics"]["train/loss"]] == LOGGED
    assert [step for step, _ in board["train/loss"]] == LOGGED
    assert set(mlflow["metrics"]) == set(board)  # train/*, eval/*, perf/*: every scalar in both
    for tag, points in board.items():  # TensorBoard keeps float32, MLflow the float64 logged
        assert [step for step, _ in mlflow["metrics"][tag]] == [step for step, _ in points], tag
        assert [value for _, value in mlflow["metrics"][tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag

    flat = TrainConfig().flat()
    assert set(mlflow["params"]) == set(flat)  # the flattened config, every key
    assert mlflow["params"]["train.max_steps"] == "6" and mlflow["params"]["model.hidden_size"] == "16"
    assert mlflow["params"]["log.log_with"] == "tensorboard,mlflow"


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, cli, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'distseq[trackers]'")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")  # a scheme mlflow has no store for
    proc = cli([*FAST, "--run-dir", tmp_path / "run", "--log-with", "tensorboard,mlflow"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distseq train: error: --log-with: mlflow could not start: "), lines


def test_a_stop_signal_while_the_trackers_start_is_the_start_up_line_not_a_traceback(tmp_path, cli, monkeypatch):
    """SIGTERM lands inside TensorBoard's start, before its writer exists (seen in a sweep whose points were
    stopped): the run ends as any stop during start-up does, and closing the trackers does not fail on it."""
    import os
    import signal

    from accelerate.tracking import TensorBoardTracker

    started = TensorBoardTracker.start

    def start_then_signal(self):
        os.kill(os.getpid(), signal.SIGTERM)  # acted on at the next bytecode: before the writer is made
        started(self)

    monkeypatch.setattr(TensorBoardTracker, "start", start_then_signal)
    proc = cli([*FAST, "--run-dir", tmp_path / "run"])
    assert proc.returncode == 143
    assert proc.stderr.strip().splitlines() == [
        "distseq train: SIGTERM during start-up: stopped before training; nothing was saved"]


def test_a_tracker_whose_server_does_not_answer_stops_the_run_in_bounded_time(tmp_path):
    """A tracking server that takes the connection and never answers: without a bound, MLflow waits 120 s per
    request and retries; with --tracker-timeout-s 2 the run ends in one line naming MLflow and the address."""
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'distseq[trackers]'")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections queue in the backlog; none is ever answered
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        proc = run_distseq([*FAST, "--run-dir", str(tmp_path / "run"), "--log-with", "tensorboard,mlflow",
                            "--tracker-timeout-s", "2"], timeout=120, env=cpu_env(MLFLOW_TRACKING_URI=uri))
        elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"distseq train: error: --log-with: mlflow did not start within 2 s "
                                                f"(--tracker-timeout-s): is {uri} reachable?"]
    assert elapsed < 60  # start-up and the 2 s bound, not MLflow's own retries


def test_bad_log_with_is_one_line_naming_the_allowed_names(tmp_path, cli):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    run_dir = tmp_path / "run"
    proc = cli([*FAST, "--run-dir", run_dir, "--log-with", "nope"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("distseq train: error: --log-with: unknown tracker 'nope' (choose from ")
    assert all(name in lines[0] for name in [*LOGGER_TYPE_TO_CLASS, "none"]), lines[0]

    proc = cli([*FAST, "--run-dir", run_dir, "--log-with", "none,tensorboard"])
    assert proc.returncode == 2 and "--log-with: none means no tracker" in proc.stderr

    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - {str(t) for t in get_available_trackers()})
    if missing:  # a tracker accelerate knows but this environment lacks: named, with what to install
        proc = cli([*FAST, "--run-dir", run_dir, "--log-with", f"tensorboard,{missing[0]}"])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"distseq train: error: --log-with: {missing[0]} is not installed: pip install ")
    assert not run_dir.exists()  # refused before anything ran


def test_default_writes_tensorboard_only_and_none_writes_no_tracker(tmp_path, cli, mlflow_store):
    default, silent = tmp_path / "default", tmp_path / "none"
    assert_ok(cli([*FAST, "--run-dir", default]))
    assert [step for step, _ in scalars(default)["train/loss"]] == LOGGED
    assert_ok(cli([*FAST, "--run-dir", silent, "--log-with", "none"]))
    assert not (silent / "tensorboard").exists() and (silent / "summary.json").is_file()
    assert not mlflow_store.exists()  # mlflow is installed (and configured here) but was not asked for
