"""Stop signals from a terminal or a scheduler: SIGINT, SIGHUP, a second SIGINT, an inherited SIG_IGN,
and a signal before training starts (at the start-up pause point, during the imports).

Every process is real and gets the signal from outside. A background job of a non-interactive shell
starts with SIGINT ignored (POSIX) and distseq keeps an inherited SIG_IGN, so each child here first
restores the default disposition of the signal it will receive (``preexec_fn``), as a terminal would.
"""

import os
import signal
import sys
import time

import psutil
import pytest
from conftest import DISTSEQ, Started, assert_ok, cpu_env, free_port, run_here, summary

# the same run as test_recovery.py's, and its uninterrupted reference (a module-scoped fixture)
from test_recovery import BASE, STEPS, assert_bit_identical, reference, weights  # noqa: F401

from distseq.checkpoint.format import read_meta
from distseq.fsio import RunDirLock

pytestmark = pytest.mark.slow  # real training runs: left out of the fast tier (-m 'not slow')

SHORT = ["train", "--max-steps", "2", "--log-every", "1", "--eval-every", "0", "--eval-size", "64",
         "--global-batch-size", "64", "--hidden-size", "16", "--no-progress", "--precision", "no"]


def start(args, logs, signals=None, session=False, **env) -> Started:
    return Started([*DISTSEQ, *args], logs, env=cpu_env(**env), signals=signals, session=session)


def step_dirs(run_dir):
    return sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []


def stopped_by(signum, run_dir, code, status):
    """Send ``signum`` after step 15 is logged: the run saves at the next boundary, prints the line
    saying so, exits ``code`` with ``status`` and no error; the saved checkpoint verifies."""
    with start([*BASE, "--run-dir", str(run_dir)], run_dir.parent / "logs", {signum.name: signal.SIG_DFL}) as proc:
        proc.wait_for_line("step=15/")
        proc.send_signal(signum)
        ended = proc.finish()
    out, err = ended.stdout, ended.stderr
    assert ended.returncode == code, f"stdout:\n{out}\nstderr:\n{err}"
    result = summary(run_dir)
    step = result["step"]
    assert result["status"] == status and 15 <= step < STEPS
    saved = run_dir / "checkpoints" / f"step-{step:08d}"
    assert f"distseq: {signum.name}: saved {saved} at step {step}; exiting {code}\n" in out
    assert read_meta(saved)[0]["step"] == step
    assert err == "", err  # a requested stop is not an error
    return saved, step


def test_sigint_saves_exits_130_and_resumes_bit_exact(reference, tmp_path):
    run_dir = tmp_path / "run"
    saved, step = stopped_by(signal.SIGINT, run_dir, 130, "interrupted")
    restarted = run_here([*BASE, "--run-dir", str(run_dir)])
    assert_ok(restarted)
    assert f"distseq: resuming from {saved} (step {step}," in restarted.stdout
    assert summary(run_dir)["status"] == "complete"
    assert_bit_identical(weights(run_dir), reference)


def test_second_sigint_exits_at_once_keeping_the_newest_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "run"
    args = [*BASE, "--run-dir", str(run_dir)]
    # DISTSEQ_PAUSE holds the process at the step boundary where the first SIGINT is acted on
    with start(args, tmp_path / "logs", {"SIGINT": signal.SIG_DFL}, DISTSEQ_PAUSE="stopping") as proc:
        proc.wait_for_line("step=15/")
        proc.send_signal(signal.SIGINT)
        proc.wait_for_line("distseq: paused at stopping")
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        ended = proc.finish()
    assert time.monotonic() - sent < 5  # at once: no save, no teardown
    out, err = ended.stdout, ended.stderr
    assert ended.returncode == 130, f"stdout:\n{out}\nstderr:\n{err}"
    assert err.strip().splitlines() == [
        "distseq: second SIGINT: exiting now without saving (the newest complete checkpoint is intact)"], err
    assert "Traceback" not in err
    complete = step_dirs(run_dir)
    # step 10 was saved before the signals (`step=15/` is logged just before step 15's own save)
    assert complete and int(complete[-1].name[5:]) >= 10, complete
    for path in complete:
        meta, _ = read_meta(path)  # every hash verifies: nothing half-written under a step-N name
        assert meta["step"] == int(path.name[5:])

    restarted = run_here(args)
    assert_ok(restarted)
    assert f"distseq: resuming from {complete[-1]} " in restarted.stdout
    assert_bit_identical(weights(run_dir), reference)
    # the save the second SIGINT cut short (at an off-interval step, e.g. 16) leaves no debris behind
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "a resumed run kept the interrupted save's .tmp-step-*"


def test_sighup_saves_and_exits_143_like_sigterm(tmp_path):
    stopped_by(signal.SIGHUP, tmp_path / "run", 143, "preempted")


def test_inherited_sig_ign_for_sigint_is_respected(tmp_path):
    """``nohup``-style: SIGINT was ignored when the process started, so it trains on to the end."""
    run_dir = tmp_path / "run"
    args = [*SHORT, "--max-steps", "10", "--run-dir", str(run_dir)]
    with start(args, tmp_path / "logs", {"SIGINT": signal.SIG_IGN}) as proc:
        proc.wait_for_line("step=3/")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # a second one does not exit either
        ended = proc.finish()
    assert ended.returncode == 0, f"stdout:\n{ended.stdout}\nstderr:\n{ended.stderr}"
    result = summary(run_dir)
    assert result["status"] == "complete" and result["step"] == 10
    assert "SIGINT" not in ended.stdout + ended.stderr


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_during_startup_stops_at_once_saving_nothing(signum, code, tmp_path):
    run_dir = tmp_path / "run"
    args = [*SHORT, "--run-dir", str(run_dir)]
    with start(args, tmp_path / "logs", {signum.name: signal.SIG_DFL}, DISTSEQ_PAUSE="startup") as proc:
        proc.wait_for_line("distseq: paused at startup")
        started = time.monotonic()
        proc.send_signal(signum)
        ended = proc.finish()
    assert time.monotonic() - started < 30  # not the pause point's minute
    assert ended.returncode == code, f"stdout:\n{ended.stdout}\nstderr:\n{ended.stderr}"
    lines = ended.stderr.strip().splitlines()
    assert len(lines) == 1, ended.stderr
    assert f"{signum.name} during start-up" in lines[0] and "nothing was saved" in lines[0], lines[0]
    assert not step_dirs(run_dir) and not list(run_dir.rglob("step-*"))
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing but the (released) lock file
    RunDirLock(run_dir).acquire().release()  # free: acquire() raises while another process holds it

    if signum == signal.SIGTERM:  # and a second run on the same --run-dir starts at once
        assert_ok(run_here(args))
        assert summary(run_dir)["status"] == "complete" and summary(run_dir)["step"] == 2


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_during_imports_is_one_line_not_a_traceback(signum, code, tmp_path):
    run_dir = tmp_path / "run"
    with start([*SHORT, "--run-dir", str(run_dir)], tmp_path / "logs", {signum.name: signal.SIG_DFL}) as proc:
        time.sleep(1.0)  # `import torch` and accelerate take seconds: this lands in them
        proc.send_signal(signum)
        ended = proc.finish()
    err = ended.stderr
    assert ended.returncode == code, f"stdout:\n{ended.stdout}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    assert err.strip(), "no message on stderr"
    assert "nothing was saved" in err.strip().splitlines()[-1], err
    assert not list(run_dir.rglob("step-*"))


IN_A_COLLECTIVE = """
import time
import torch
import torch.distributed as dist
from distseq.ops import signals

signals.install()  # what the command line does before `train`
signals.watch_unheard()
dist.init_process_group("gloo")
with signals.StopSignals() as stop:
    stop.begin_loop()  # training: a signal heard now is acted on at the next step boundary
    if dist.get_rank() == 1:
        time.sleep(120)  # a peer that hangs
    print("in the all-reduce", flush=True)
    dist.all_reduce(torch.ones(1))
"""


def test_a_rank_blocked_inside_torch_obeys_sigterm(tmp_path):
    """Python's handlers run only between bytecodes, never while the main thread waits inside torch's C++.
    Two such ranks, side by side: rank 0 of a group of two started alone (`distseq train`; its store waits
    for rank 1, which never comes), and rank 0 of a script's group in training, inside gloo's all-reduce
    while rank 1 hangs. SIGTERM ends each within seconds (the second after half the launcher's shutdown
    timeout, here 2 s), with 143 and one line saying it was blocked."""
    alone, port = tmp_path / "alone", free_port()
    alone_env = {**cpu_env(), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    script, collective_port = tmp_path / "collective.py", free_port()
    script.write_text(IN_A_COLLECTIVE)

    def collective_rank(r):
        env = {**cpu_env(), "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(collective_port), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"}
        return Started([sys.executable, str(script)], tmp_path / "collective", env=env,
                       signals={"SIGTERM": signal.SIG_DFL})

    with Started([*DISTSEQ, *SHORT, "--run-dir", str(alone / "run")], alone, env=alone_env,
                 signals={"SIGTERM": signal.SIG_DFL}) as starting, collective_rank(0) as training, collective_rank(1):
        deadline = time.monotonic() + 120
        while not listening(starting.pid, port):  # its store is up: from here it waits for rank 1, inside torch
            assert starting.popen.poll() is None and time.monotonic() < deadline, starting.describe()
            time.sleep(0.1)
        alone_ended, alone_took = stopped(starting)
        training.wait_for_line("in the all-reduce", timeout=120)
        time.sleep(0.5)  # inside the all-reduce: a signal heard before it would wait for the step boundary
        training_ended, training_took = stopped(training)
    assert alone_ended.returncode == 143 and alone_took < 15, (alone_took, alone_ended)
    assert alone_ended.stderr.strip().splitlines() == [
        "distseq: SIGTERM during start-up: stopped before training; nothing was saved (blocked for 2 s inside torch, "
        "most likely waiting for another process)"], alone_ended.stderr
    assert training_ended.returncode == 143 and training_took < 10, (training_took, training_ended)
    assert training_ended.stderr.strip().splitlines() == [
        "distseq: SIGTERM: exiting now without saving: blocked for 1 s inside torch, most likely waiting for another "
        "process (the newest complete checkpoint is intact)"], training_ended.stderr


def stopped(process: Started):
    """SIGTERM to ``process``; how it ended and how many seconds that took."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    ended = process.finish(timeout=20)
    return ended, time.monotonic() - sent


def listening(pid: int, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections(kind="tcp"))
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_process_group_with_dataloader_workers_saves(signum, tmp_path):
    """SLURM's preemption and Ctrl-C signal the whole process group, DataLoader workers included: the workers
    ignore it, the main process saves at the step boundary and exits 143 (130), no worker traceback."""
    run_dir = tmp_path / "run"
    args = ["train", "--max-steps", "100000", "--log-every", "5", "--eval-every", "0", "--eval-size", "64",
            "--global-batch-size", "24", "--hidden-size", "8", "--num-workers", "2", "--no-progress", "--run-dir",
            str(run_dir)]
    with start(args, tmp_path / "logs", {"SIGINT": signal.SIG_DFL}, session=True) as proc:
        proc.wait_for_line("step=10/")
        os.killpg(proc.pid, signum)
        ended = proc.finish()
    assert ended.returncode == (143 if signum == signal.SIGTERM else 130), ended.stderr[-3000:]
    result = summary(run_dir)
    saved = run_dir / "checkpoints" / f"step-{result['step']:08d}"
    assert saved.is_dir() and f"saved {saved} at step {result['step']}" in ended.stdout
    assert "Traceback" not in ended.stderr and "DataLoader worker" not in ended.stderr
