"""Operating on a cluster: in-job restarts, the slow-rank report, and how `distseq launch` ends.

Every run is real: torchrun or `distseq launch` (accelerate's launcher) on loopback with gloo, a rank
killed with SIGKILL by the test, SIGTERM and SIGINT sent to the launcher. The stuck-rank report (a
frozen rank, RUN/hang-rank{N}.txt) is tested in tests/test_recovery.py next to the timeout it follows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from conftest import REPO, checkpoint_weights, cpu_env, run_main, scalars, summary
from distseq.stragglers import compare_ranks

ARGS = ["--max-steps", "60", "--checkpoint-every", "10", "--log-every", "5", "--eval-every", "0", "--eval-size",
        "64", "--global-batch-size", "32", "--hidden-size", "16", "--no-progress", "--precision", "no"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
LAUNCH = [sys.executable, "-m", "distseq.cli", "launch"]
TWO = ["--multi_gpu", "--num_processes", "2"]


def start(cmd, env=None) -> subprocess.Popen:
    """A launcher with SIGINT at its default (a background job of a shell would inherit it ignored)."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cpu_env(),
                            cwd=REPO, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def ranks_of(launcher: subprocess.Popen) -> list:
    """The rank processes under a launcher (torchrun starts them in sessions of their own)."""
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "distseq.cli" in " ".join(p.cmdline())]


def run_until(cmd, line_start: str, act, env=None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``cmd``; when a stdout line starts with ``line_start``, call ``act(launcher)`` once."""
    proc, out, acted = start(cmd, env), [], False
    try:
        for line in proc.stdout:
            out.append(line)
            if not acted and line.startswith(line_start):
                act(proc)
                acted = True
        _, err = proc.communicate(timeout=timeout)
    finally:
        for p in ranks_of(proc) if proc.poll() is None else []:
            p.kill()
        proc.kill()
    assert acted, f"never saw {line_start!r}:\n{''.join(out)[-2000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), err)


def kill_one_rank(launcher: subprocess.Popen) -> None:
    victim = max(ranks_of(launcher), key=lambda p: p.pid)  # the newest: a rank, never the launcher itself
    victim.send_signal(signal.SIGKILL)


def weights_at(run_dir, step: int) -> dict:
    return checkpoint_weights(run_dir / "checkpoints" / f"step-{step:08d}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = subprocess.run([*TORCHRUN, "--standalone", "-m", "distseq.cli", "train", *ARGS, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=240, env=cpu_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def assert_healed(proc: subprocess.CompletedProcess, run_dir, uninterrupted) -> None:
    """The group restarted once, resumed from a checkpoint before the kill at step 25 (20; 10 when a background
    save of 20 was still in flight) and ended like a run never killed."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = re.findall(rf"distseq: resuming from {run_dir}/checkpoints/step-000000(\d\d) \(step (\d+), (\d+) "
                         rf"samples, written by 2 process", proc.stdout)
    assert len(resumed) == 1 and resumed[0] in (("20", "20", "640"), ("10", "10", "320")), proc.stdout[-3000:]
    result = summary(run_dir)
    assert (result["status"], result["step"], result["world_size"]) == ("complete", 60, 2)
    a, b = weights_at(uninterrupted, 60), weights_at(run_dir, 60)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # byte-identical


@pytest.mark.multiproc
def test_torchrun_restarts_a_crashed_rank_in_place(uninterrupted, tmp_path):
    """The documented torchrun flags: c10d rendezvous, a fresh store per attempt."""
    run_dir = tmp_path / "run"
    cmd = [*TORCHRUN, "--max-restarts", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
           "-m", "distseq.cli", "train", *ARGS, "--run-dir", str(run_dir)]
    proc = run_until(cmd, "step=25/", kill_one_rank, env=cpu_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    assert_healed(proc, run_dir, uninterrupted)


@pytest.mark.multiproc
def test_distseq_launch_restarts_a_crashed_rank_with_accelerates_max_restarts(uninterrupted, tmp_path):
    """Asynchronous checkpoints too: their gloo group of their own is created again in each attempt."""
    run_dir = tmp_path / "run"
    cmd = [*LAUNCH, *TWO, "--max_restarts", "2", "train", *ARGS, "--async-checkpoint", "--run-dir", str(run_dir)]
    proc = run_until(cmd, "step=25/", kill_one_rank)
    assert_healed(proc, run_dir, uninterrupted)
    assert "Traceback" not in proc.stderr


@pytest.mark.multiproc
def test_distseq_launch_ends_with_the_ranks_meaning_not_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    endless = [a if a != "60" else "100000" for a in ARGS]

    # preempted: SIGTERM to the launcher reaches every rank, which save; 143
    proc = run_until([*LAUNCH, *TWO, "train", *endless, "--run-dir", str(run_dir)], "step=10/",
                     lambda p: p.send_signal(signal.SIGTERM))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "distseq: SIGTERM: saved" in proc.stdout and "exiting 143" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == ("distseq launch: SIGTERM: passed to every rank (each saves at "
                                                    "its next step boundary); exiting 143")
    assert summary(run_dir)["status"] == "preempted" and "Traceback" not in proc.stderr

    # bad input the ranks find (a checkpoint of another model): every rank exits 2, and so does the launcher
    proc = subprocess.run([*LAUNCH, *TWO, "train", *endless[:-2], "--hidden-size", "32", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=180, env=cpu_env(), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "distseq train: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "distseq launch: rank 0 exited 2 (bad input: its own line above says why)" in proc.stderr

    # a crash without restarts: 1, naming the rank and the signal
    proc = run_until([*LAUNCH, *TWO, "train", *endless, "--run-dir", str(tmp_path / "crash")], "step=10/",
                     kill_one_rank)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "was killed by SIGKILL (failed: its own line above says why)" in proc.stderr

    # interrupted, one process (accelerate's simple launcher's command, the signal passed on): 130
    proc = run_until([*LAUNCH, "--num_processes", "1", "train", *endless, "--run-dir", str(tmp_path / "one")],
                     "step=10/", lambda p: p.send_signal(signal.SIGINT))
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "distseq: SIGINT: saved" in proc.stdout and "Traceback" not in proc.stderr
    assert "distseq launch: rank 0 exited 130 (interrupted" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["launch", *TWO, "bogus"], "distseq launch: error: COMMAND: expected a command to run on every rank, one of "
                                "train, eval, after the launcher's options (got 'bogus')"),
    (["launch", *TWO, "train", "--global-batch-size", "3"],
     "distseq launch: error: --global-batch-size: 3 is not divisible by processes x --grad-accum-steps = 2 x 1 = 2"),
    (["launch", *TWO, "train", "--straggler-factor", "0.5"],
     "distseq launch: error: --straggler-factor: must be a finite number > 1, or 0 to never report a slow rank"),
    (["launch", "--num_processes", "1", "--max_restarts", "2", "train"],
     "distseq launch: error: --max_restarts: restarts need the multi-process launcher"),
    (["launch", "--multi_gpu", "--num_processes", "1", "train"],
     "distseq launch: error: launcher options: You need to use at least 2 processes to use `--multi_gpu`."),
])
def test_distseq_launch_checks_before_any_rank_starts(argv, message, capsys):
    proc = run_main(argv, capsys)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_distseq_launch_help_explains_and_lists_accelerates_options(capsys):
    proc = run_main(["launch", "--help"], capsys)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: distseq launch [ACCELERATE LAUNCH OPTIONS] {train,eval} [OPTIONS]")
    assert "--max_restarts" in proc.stdout and "143 (preempted)" in proc.stdout and "TORCH_DISABLE_SHARE" in proc.stdout


@pytest.mark.multiproc
def test_a_slow_rank_is_named_in_the_log_line_tensorboard_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [*TORCHRUN, "--standalone", "-m", "distseq.cli", "train", *ARGS[2:], "--max-steps", "12", "--log-every", "4",
           "--checkpoint-every", "0", "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO,
                          env=cpu_env(DISTSEQ_SLOW_RANK="1:40"))  # rank 1 sleeps 40 ms in each step's own work
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step=") and "train/loss" in line]
    assert len(lines) == 3 and all(" | rank 1 is " in line and "× slower than the median" in line for line in lines)
    result = summary(run_dir)
    assert result["perf/slowest_rank"] == 1 and result["rank_step_time_ms"][1] >= 40 > result["rank_step_time_ms"][0]
    assert result["perf/step_time_ms_max"] == result["rank_step_time_ms"][1]
    assert result["perf/step_time_ms_min"] == result["rank_step_time_ms"][0]
    logged = scalars(run_dir)
    assert [step for step, _ in logged["perf/slowest_rank"]] == [4, 8, 12]
    assert all(value == 1 for _, value in logged["perf/slowest_rank"])
    assert all(value >= 40 for _, value in logged["perf/step_time_ms_max"])
    assert all(value < 40 for _, value in logged["perf/step_time_ms_min"])


@pytest.mark.parametrize("per_rank, step_ms, factor, note", [
    ([10.0, 30.0], 40.0, 1.5, "rank 1 is 3.0× slower than the median (30.0 ms vs 10.0 ms per step of its own work)"),
    ([10.0, 30.0], 40.0, 0.0, ""),  # 0: never said
    ([10.0, 30.0], 40.0, 3.5, ""),  # below the factor
    ([1.3, 2.0], 10.0, 1.5, ""),  # 1.5x, but 0.7 ms of a 10 ms step: noise
    ([5.0, 5.0, 20.0, 5.0, 6.0], 25.0, 1.5, "rank 2 is 4.0× slower than the median (20.0 ms vs 5.0 ms per step"),
    ([7.0], 7.0, 1.5, ""),  # one process: nobody to compare with
])
def test_compare_ranks_names_a_costly_straggler_only(per_rank, step_ms, factor, note):
    figures, said = compare_ranks(per_rank, step_ms, factor)
    assert said.startswith(note) and (said == "") == (note == "")
    assert figures["perf/step_time_ms_min"] == min(per_rank) and figures["perf/step_time_ms_max"] == max(per_rank)
    assert figures["perf/slowest_rank"] == per_rank.index(max(per_rank))
