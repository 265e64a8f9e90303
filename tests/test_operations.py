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

import pytest
import torch
from conftest import (
    REPO,
    Started,
    assert_bit_identical,
    cpu_env,
    free_port,
    run_main,
    run_until,
    scalars,
    summary,
    two_process_args,
    weights_at,
)

from distseq.ops.stragglers import compare_ranks

ARGS = ["--max-steps", "60", "--checkpoint-every", "10", "--log-every", "5", "--eval-every", "0", "--eval-size",
        "64", "--global-batch-size", "32", "--hidden-size", "16", "--no-progress", "--precision", "no"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
LAUNCH = [sys.executable, "-m", "distseq.cli", "launch"]
TWO = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]  # 0: a free port


def kill_one_rank(launcher: Started) -> None:
    victim = max(launcher.ranks(), key=lambda p: p.pid)  # the newest: a rank, never the launcher itself
    victim.send_signal(signal.SIGKILL)


def as_a_terminal_job(cmd, prefix, act, tmp_path, env=None):
    """``run_until`` for a launcher in a process group of its own with SIGINT at its default, as a terminal's
    foreground job (a background job of a shell would inherit SIGINT ignored)."""
    return run_until(cmd, prefix, act, tmp_path / "logs", env=env, session=True, signals={"SIGINT": signal.SIG_DFL})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = subprocess.run([*TORCHRUN, "--standalone", "-m", "distseq.cli", "train", *ARGS, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=240, env=cpu_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def assert_healed(proc: subprocess.CompletedProcess, run_dir, uninterrupted) -> None:
    """The group restarted once, resumed from a checkpoint of the killed attempt (20 for a kill at step 25; 10
    when a background save was in flight, 30 when the kill came late on a busy machine) and ended like a run
    never killed."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = re.findall(rf"distseq: resuming from {run_dir}/checkpoints/step-000000(\d\d) \(step (\d+), (\d+) "
                         rf"samples, written by 2 process", proc.stdout)
    assert len(resumed) == 1 and resumed[0][0] == resumed[0][1] in ("10", "20", "30"), proc.stdout[-3000:]
    assert int(resumed[0][2]) == 32 * int(resumed[0][1])
    result = summary(run_dir)
    assert (result["status"], result["step"], result["world_size"]) == ("complete", 60, 2)
    assert_bit_identical(weights_at(run_dir, 60), weights_at(uninterrupted, 60))


# Under the static rendezvous one store serves every attempt, and the dead attempt's keys stay in it: a rank
# that reads a peer's key before the peer wrote it anew connects to a process that is gone (refused, or a
# wait of minutes in gloo's connect, which run_until's timeout bounds). Rank 0 joining 3 s late in a
# restarted attempt (a failpoint) makes rank 1 read rank 0's old key in every restarted attempt, not only
# when it happens to come first (unless the machine delays rank 1 by more). 30 s bounds the store's waits.
LATE_RESTART = {"DISTSEQ_LATE_RESTART": "0:3"}
BOUNDED = ["--dist-timeout-s", "30"]


@pytest.mark.multiproc
def test_torchrun_restarts_a_crashed_rank_with_its_default_rendezvous(uninterrupted, tmp_path):
    """What most users type: torchrun's static rendezvous, no rendezvous options. (The c10d rendezvous with a
    fresh store per attempt, the way across machines, is what `distseq launch --max_restarts` runs below.)"""
    run_dir = tmp_path / "run"
    cmd = [*TORCHRUN, "--max-restarts", "2", "--master-port", str(free_port()), "-m", "distseq.cli", "train", *ARGS,
           *BOUNDED, "--run-dir", str(run_dir)]
    proc = as_a_terminal_job(cmd, "step=25/", kill_one_rank, tmp_path, env=cpu_env(**LATE_RESTART))
    assert_healed(proc, run_dir, uninterrupted)


@pytest.mark.multiproc
def test_accelerate_launch_restarts_a_crashed_rank_with_its_default_rendezvous(uninterrupted, tmp_path):
    """`accelerate launch --max_restarts` (its rendezvous is torch's static one too), two CPU ranks."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *two_process_args(), "--max_restarts", "2", "-m",
           "distseq.cli", "train", *ARGS, *BOUNDED, "--run-dir", str(run_dir)]
    proc = as_a_terminal_job(cmd, "step=25/", kill_one_rank, tmp_path, env=cpu_env(**LATE_RESTART))
    assert_healed(proc, run_dir, uninterrupted)


@pytest.mark.multiproc
def test_distseq_launch_restarts_a_crashed_rank_with_accelerates_max_restarts(uninterrupted, tmp_path):
    """Asynchronous checkpoints too: their gloo group of their own is created again in each attempt."""
    run_dir = tmp_path / "run"
    cmd = [*LAUNCH, *TWO, "--max_restarts", "2", "train", *ARGS, "--async-checkpoint", "--run-dir", str(run_dir)]
    proc = as_a_terminal_job(cmd, "step=25/", kill_one_rank, tmp_path)
    assert_healed(proc, run_dir, uninterrupted)
    assert "Traceback" not in proc.stderr


@pytest.mark.multiproc
def test_distseq_launch_ends_with_the_ranks_meaning_not_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    endless = [a if a != "60" else "100000" for a in ARGS]

    # preempted: SIGTERM to the launcher reaches every rank, which save; 143
    proc = as_a_terminal_job([*LAUNCH, *TWO, "train", *endless, "--run-dir", str(run_dir)], "step=10/",
                     lambda p: p.send_signal(signal.SIGTERM), tmp_path)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "distseq: SIGTERM: saved" in proc.stdout and "exiting 143" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == ("distseq launch: SIGTERM: passed to every rank, asking each to "
                                                    "save at its next step boundary; exiting 143")
    assert summary(run_dir)["status"] == "preempted" and "Traceback" not in proc.stderr

    # bad input the ranks find (a checkpoint of another model): every rank exits 2, and so does the launcher
    proc = subprocess.run([*LAUNCH, *TWO, "train", *endless[:-2], "--hidden-size", "32", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=180, env=cpu_env(), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "distseq train: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert re.search(r"distseq launch: rank [01] exited 2 \(bad input: its own line above says why\)(; 1 other "
                     r"rank\(s\) failed too)?; exiting 2\n$", proc.stderr), proc.stderr[-2000:]

    # SIGUSR1 (SLURM's warning before the time limit) and SIGHUP (a closed terminal) to the launcher: as
    # SIGTERM; SIGINT to the launcher alone: 130
    for sig, code, status in ((signal.SIGUSR1, 143, "preempted"), (signal.SIGHUP, 143, "preempted"),
                              (signal.SIGINT, 130, "interrupted")):
        run = tmp_path / sig.name
        proc = as_a_terminal_job([*LAUNCH, *TWO, "train", *endless, "--run-dir", str(run)], "step=10/",
                                 lambda p: p.send_signal(sig), tmp_path)
        assert proc.returncode == code and f"distseq: {sig.name}: saved" in proc.stdout, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1] == (f"distseq launch: {sig.name}: passed to every rank, asking "
                                                        f"each to save at its next step boundary; exiting {code}")
        assert summary(run)["status"] == status and "Traceback" not in proc.stderr

    # a crash without restarts: 1, naming the rank and the signal
    proc = as_a_terminal_job([*LAUNCH, *TWO, "train", *endless, "--run-dir", str(tmp_path / "crash")], "step=10/",
                     kill_one_rank, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"distseq launch: rank [01] was killed by SIGKILL \(failed: it could print no line of its "
                     r"own\)(; 1 other rank\(s\) failed too)?; exiting 1\n$", proc.stderr), proc.stderr[-2000:]

    # Ctrl-C in a terminal (SIGINT to the launcher's whole process group), one process: the rank is in a
    # session of its own, so it gets the signal once, from the launcher, and saves (twice would not): 130
    proc = as_a_terminal_job([*LAUNCH, "--num_processes", "1", "train", *endless, "--run-dir", str(tmp_path / "one")],
                     "step=10/", lambda p: os.killpg(p.pid, signal.SIGINT), tmp_path)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "distseq: SIGINT: saved" in proc.stdout and "Traceback" not in proc.stderr
    assert "distseq launch: rank 0 exited 130 (interrupted" in proc.stderr

    # restarts exhausted: a bad input fails every attempt alike, and the last line is still the launcher's own
    proc = subprocess.run([*LAUNCH, *TWO, "--max_restarts", "1", "train", *endless[:-2], "--hidden-size", "32",
                           "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=180, env=cpu_env(),
                          cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"distseq launch: rank [01] exited 2 \(bad input: its own line above says why\)(; 1 other "
                     r"rank\(s\) failed too)?; exiting 2\n$", proc.stderr), proc.stderr[-2000:]


def test_torchs_launcher_logs_nothing_after_distseq_launchs_last_line():
    """The ordering is structural: torch's launcher's warnings are dropped while the launch runs, its errors
    pass, and once the last line is due nothing of it is written, whatever thread logs it."""
    import io
    import logging
    import threading

    from distseq.ops.quiet import LauncherLogs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    torch_logs = logging.getLogger("torch.distributed")
    torch_logs.addHandler(handler)
    agent = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    logs = LauncherLogs()
    try:
        logs.install()
        agent.warning("Sending process 1 closing signal SIGTERM")
        agent.error("failed (exitcode: 1) local_rank: 0")
        logging.getLogger("torch.distributed.elsewhere").warning("not the launcher's")
        logs.close()
        late = threading.Thread(target=lambda: agent.error("keep-alive: the store is gone"))
        late.start()
        late.join()
        logging.getLogger("torch.distributed.elastic.rendezvous").warning("late too")
    finally:
        torch_logs.removeHandler(handler)
        logs.uninstall()
    assert stream.getvalue().splitlines() == ["failed (exitcode: 1) local_rank: 0", "not the launcher's"]


@pytest.mark.parametrize("argv, message", [
    (["launch", *TWO, "bogus"], "distseq launch: error: COMMAND: expected a command to run on every rank, one of "
                                "train, eval, after the launcher's options (got 'bogus'; see distseq launch --help)"),
    (["launch", *TWO], "distseq launch: error: COMMAND: expected a command to run on every rank, one of train, eval, "
                       "after the launcher's options (got nothing; see distseq launch --help)"),
    (["launch", "--bogus-option", "3", "train"],
     "distseq launch: error: launcher options: unrecognized arguments: --bogus-option (see distseq launch --help)"),
    (["launch", "--num_processes", "2", "--num_machines", "2", "train"],
     "distseq launch: error: launcher options: When using multiple machines, you need to specify the main process "
     "IP. (one process: several need --multi_gpu --num_processes N; see distseq launch --help)"),
    (["launch", "--config_file", "/no/such.yaml", "train"],
     "distseq launch: error: launcher options: The passed configuration file `/no/such.yaml` does not exist."),
    (["launch", "--num_processes", "x", "train"],
     "distseq launch: error: launcher options: argument --num_processes/--num-processes: invalid int value: 'x' "
     "(see distseq launch --help)"),
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
    assert run_main(["launch", "--num_processes", "2", "-h"], capsys).stdout == run_main(["launch", "--help"]).stdout
    proc = run_main(["launch", "--help"], capsys)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: distseq launch [ACCELERATE LAUNCH OPTIONS] {train,eval} [OPTIONS]")
    assert "--max_restarts" in proc.stdout and "143 (preempted)" in proc.stdout and "TORCH_DISABLE_SHARE" in proc.stdout


# the straggler's sleep in each step's own work (ms). Besides it, the two ranks' own work differs by a few ms a step,
# and in the first window by their first step too (the first batch's generation, first forward and update): measured
# on a loaded machine, the fast rank's first window averaged 40-70 ms a step where later ones took 1-8 (a 60 ms sleep
# once showed a gap of 31 ms there). So the first window's gap must be a third of the sleep (the fast rank would need
# ~400 ms more own work to close the rest), every later one two thirds (~200 ms more), as must the summary's.
SLOW_MS = 150


@pytest.mark.multiproc
@pytest.mark.parametrize("model, slow", [("lstm", 1), ("transformer", 0)])  # the transformer has buffers
def test_a_slow_rank_is_named_in_the_log_line_tensorboard_and_summary(model, slow, tmp_path):
    run_dir, fast = tmp_path / "run", 1 - slow
    cmd = [*TORCHRUN, "--standalone", "-m", "distseq.cli", "train", *ARGS[2:], "--max-steps", "12", "--log-every", "4",
           "--checkpoint-every", "0", "--model", model, "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO,
                          env=cpu_env(DISTSEQ_SLOW_RANK=f"{slow}:{SLOW_MS}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step=") and "train/loss" in line]
    assert len(lines) == 3
    assert all(f" | rank {slow} is " in line and "× slower than the median" in line for line in lines), lines
    result = summary(run_dir)
    per_rank = result["rank_step_time_ms"]
    assert result["perf/slowest_rank"] == slow and per_rank[slow] >= SLOW_MS
    assert per_rank[slow] - per_rank[fast] >= SLOW_MS * 2 / 3, per_rank  # the last window's
    assert (result["perf/step_time_ms_max"], result["perf/step_time_ms_min"]) == (per_rank[slow], per_rank[fast])
    logged = scalars(run_dir)
    assert [step for step, _ in logged["perf/slowest_rank"]] == [4, 8, 12]
    assert all(value == slow for _, value in logged["perf/slowest_rank"])
    # every window counts the sleep, and shows the gap: a third of it in the first (the ranks' warm-up), then two thirds
    assert all(value >= SLOW_MS for _, value in logged["perf/step_time_ms_max"]), logged["perf/step_time_ms_max"]
    gaps = [high - low for (_, high), (_, low) in zip(logged["perf/step_time_ms_max"], logged["perf/step_time_ms_min"])]
    assert gaps[0] >= SLOW_MS / 3 and min(gaps[1:]) >= SLOW_MS * 2 / 3, gaps


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


def test_a_hang_report_names_this_attempts_file_and_keeps_the_last_one_aside(tmp_path):
    from distseq.ops.hangs import HangReport

    (tmp_path / "hang-rank1.txt").write_text("an earlier attempt's stacks\n")
    report = HangReport()
    report.attach(tmp_path, rank=1, world=2)
    assert report.attached and not (tmp_path / "hang-rank1.txt").exists()
    assert (tmp_path / "hang-rank1.previous.txt").read_text() == "an earlier attempt's stacks\n"
    try:
        raise RuntimeError("[gloo] Timed out waiting 8000ms for recv operation to complete")
    except RuntimeError as failed:
        error = report.lost_contact(failed)
    assert str(error).startswith("lost contact with another process: [gloo] Timed out waiting 8000ms")
    assert f"this rank's Python stacks are in {tmp_path / 'hang-rank1.txt'}" in str(error)
    text = (tmp_path / "hang-rank1.txt").read_text()
    assert text.startswith("distseq: rank 1 of 2, pid ") and "test_a_hang_report_names" in text
    assert "Every thread of this process now:" in text
    one = HangReport()
    one.attach(tmp_path, rank=0, world=1)
    assert not one.attached  # one process has no peer to lose: its errors stay as they are


def test_ddp_broadcasts_buffers_only_when_a_model_saves_some():
    from torch import nn

    from distseq.distributed.accelerator import needs_buffer_broadcast

    constant = nn.Linear(2, 2)
    constant.register_buffer("table", torch.zeros(3), persistent=False)
    assert not needs_buffer_broadcast(constant)
    assert needs_buffer_broadcast(nn.BatchNorm1d(2))  # running statistics, saved
    assert needs_buffer_broadcast(nn.Linear(2, 2))  # no buffers: DDP's default, which broadcasts nothing
