"""Helpers shared by the tests: run distseq in this process or as real processes, follow a process line by
line, read what a run wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import psutil
import pytest
import torch

from distseq.distributed.accelerator import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["--max-steps", "6", "--log-every", "2", "--eval-every", "3", "--eval-size", "256", "--no-progress"]
DISTSEQ = [sys.executable, "-m", "distseq.cli"]


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


class Started:
    """A process a test started (``distseq ...``, a launcher, torchrun), followed line by line.

    A thread reads its stdout as it comes (``wait_for_line`` returns the moment the line is read, so a
    signal sent then lands at that step) and keeps a copy in a file under ``logs``; stderr goes to a file
    (no pipe fills up and stalls it). Leaving the ``with`` block, or ``close()``, kills whatever it started
    that still runs, its children first (torchrun and distseq launch start ranks in sessions of their own).
    ``session``: a process group of its own, as a terminal's foreground job; ``signals``: the dispositions
    it starts with, e.g. ``{"SIGINT": signal.SIG_DFL}`` (a background job of a non-interactive shell
    inherits SIGINT ignored, and distseq keeps an inherited SIG_IGN)."""

    def __init__(self, cmd: List[str], logs: Path, *, env=None, session: bool = False, signals: Optional[dict] = None):
        logs.mkdir(parents=True, exist_ok=True)
        stem = f"process-{len(list(logs.glob('process-*.err')))}"
        self.stdout_path, self.stderr_path = logs / f"{stem}.out", logs / f"{stem}.err"
        with open(self.stderr_path, "w") as err:
            self.popen = subprocess.Popen(
                [str(a) for a in cmd], stdout=subprocess.PIPE, stderr=err, text=True, env=env or cpu_env(), cwd=REPO,
                start_new_session=session, preexec_fn=disposition(**signals) if signals else None)
        self.pid, self.seen, self.lines = self.popen.pid, [], []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.stdout_path, "w") as copy:
            for line in self.popen.stdout:
                copy.write(line)
                copy.flush()
                with self.changed:
                    self.lines.append(line)
                    self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # end of output
            self.changed.notify_all()

    def __enter__(self) -> "Started":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def output(self):
        return "".join(line for line in self.lines if line is not None), self.stderr_path.read_text()

    def describe(self) -> str:
        out, err = self.output()
        return f"exit {self.popen.poll()}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"

    def wait_for_line(self, prefix: str, timeout: float = 180) -> str:
        """The first stdout line starting with ``prefix``, as soon as it is read."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = next((line for line in self.lines if line is not None and line.startswith(prefix)), None)
                if found is not None:
                    break
                if self.lines and self.lines[-1] is None:
                    pytest.fail(f"the process ended before printing {prefix!r}: {self.describe()}")
                if not self.changed.wait(timeout=max(0.0, deadline - time.monotonic())):
                    pytest.fail(f"no line starting with {prefix!r} within {timeout:.0f} s: {self.describe()}")
        self.seen += self.children()  # ranks start in sessions of their own: remember them
        return found

    def children(self) -> list:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def ranks(self) -> list:
        """The rank processes under a launcher: its children running distseq.cli (one ending now counts)."""
        found = []
        for child in self.children():
            try:
                if "distseq.cli" in " ".join(child.cmdline()):
                    found.append(child)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                found.append(child)
        return found

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def finish(self, timeout: float = 180) -> subprocess.CompletedProcess:
        """Its exit code, stdout and stderr once it has exited (a test failure naming what still runs after
        ``timeout`` seconds)."""
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            alive = [rank.pid for rank in self.ranks()]
            self.close()
            pytest.fail(f"did not exit within {timeout:.0f} s (rank processes still running: {alive})\n"
                        f"{self.describe()}")
        self.reader.join(timeout=30)
        return subprocess.CompletedProcess(self.popen.args, self.popen.returncode, *self.output())

    def close(self) -> None:
        started = self.children() + self.seen
        for process in started:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(started, timeout=10)
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=30)
        self.reader.join(timeout=30)


def disposition(**handlers):
    """A preexec_fn that sets the child's signal dispositions, e.g. ``SIGINT=signal.SIG_DFL``."""
    def apply():
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)
    return apply


def run_until(cmd: List[str], prefix: str, act: Callable[[Started], None], logs: Path, *, timeout: float = 180,
              **start) -> subprocess.CompletedProcess:
    """Run ``cmd``; once a stdout line starts with ``prefix``, call ``act(process)``; its outcome once it ends.
    Whatever it started is killed at the end, however the test ends."""
    with Started(cmd, logs, **start) as process:
        process.wait_for_line(prefix, timeout)
        act(process)
        return process.finish(timeout)


def weights_at(run_dir, step: int) -> dict:
    """The whole weights of ``run_dir``'s checkpoint of ``step``."""
    return checkpoint_weights(Path(run_dir) / "checkpoints" / f"step-{step:08d}")


def assert_bit_identical(got: dict, want: dict) -> None:
    """Bit-identical: the same names, each tensor equal to the last bit."""
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def run_here(args) -> subprocess.CompletedProcess:
    """``distseq ARGS`` in this process, its output captured (no interpreter start: seconds faster than
    ``run_distseq``). For what a process's own start and end do not change: a run's outcome and files."""
    import contextlib
    import io

    from distseq.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_info:
            code = exit_info.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_main(args, capsys=None) -> subprocess.CompletedProcess:
    """``run_here``; ``capsys`` is not needed (kept for the tests that pass it)."""
    return run_here(args)


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

    from distseq.checkpoint.dcp import load_state
    from distseq.inference.export import config_of
    from distseq.models import build_model
    from distseq.registry import TASKS

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
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")


# The files that take longest, longest first (each file's durations summed, `./launch/test --durations=0`, on the
# 2-core box). ./launch/test's workers take whole files in the order collected (--no-loadscope-reorder), so these
# start first and the short ones fill in at the end; xdist's own order (most tests first) left files of few, long
# tests to the end (test_bench.py's quick bench, test_slurm.py, test_scale.py), run by one worker while the other
# had nothing left. A file not listed keeps its place after them.
LONGEST_FILES = ("test_bench.py", "test_sharding.py", "test_operations.py", "test_slurm.py", "test_mixers.py",
                 "test_recovery.py", "test_sweep.py", "test_check_task.py", "test_files.py", "test_plugins.py",
                 "test_signals.py", "test_launch.py", "test_multiprocess.py", "test_use.py", "test_train.py",
                 "test_lm_data.py", "test_scale.py", "test_io_errors.py")


def pytest_collection_modifyitems(items):
    """Every test that starts real processes is slow too: the fast tier runs in one process. The longest files
    first (a stable sort: each file's tests stay together and in their order)."""
    for item in items:
        if item.get_closest_marker("multiproc"):
            item.add_marker(pytest.mark.slow)
    first = {name: rank for rank, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test computes on one thread, as every process the tests start does (cpu_env): the results of
    in-process and launched runs are then bit-comparable, and two test workers (xdist) share two cores."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The --data-files indexes of the whole session go to one fresh cache, never the user's."""
    path = tmp_path_factory.mktemp("distseq-cache")
    os.environ["DISTSEQ_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def stop_signals_untouched():
    """A test that leaves a stop signal ignored (or handled) in this worker makes every process it starts later
    inherit that (an ignored SIGTERM stays ignored): later tests of signals would fail for it. Each test's
    dispositions are restored after it, and one that changed them fails, naming them."""
    from distseq.ops.signals import STOP_SIGNALS

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    changed = [sig.name for sig, handler in before.items() if signal.getsignal(sig) is not handler]
    for sig, handler in before.items():
        signal.signal(sig, handler)
    if changed:
        pytest.fail(f"the test left the disposition of {', '.join(changed)} changed in this process")


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
        TASKS.remove(name)


@pytest.fixture
def without_matplotlib(monkeypatch):
    """This test's imports of matplotlib fail, as where it is not installed."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
