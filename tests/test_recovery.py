"""Crash-proof training: kills, damaged checkpoints, preemption, world-size changes, non-finite losses, hangs.

Every process here is real: SIGKILL from outside or from a failpoint, SIGTERM/SIGUSR1, gloo on loopback.
"""

import hashlib
import json
import os
import shutil
import signal
import sys
import time

import pytest
import torch
from conftest import (
    DISTSEQ,
    Started,
    assert_bit_identical,
    assert_ok,
    checkpoint_training_state,
    checkpoint_weights,
    cpu_env,
    free_port,
    run_here,
    run_until,
    scalars,
    summary,
    two_process_args,
    weights_at,
)
from safetensors.torch import load_file, save_file

from distseq.data.verify import Digest

pytestmark = pytest.mark.slow  # real training runs: left out of the fast tier (-m 'not slow')

STEPS, GLOBAL_BATCH = 40, 64
BASE = ["train", "--max-steps", str(STEPS), "--checkpoint-every", "5", "--keep-last", "3", "--log-every", "5",
        "--eval-every", "0", "--eval-size", "64", "--global-batch-size", str(GLOBAL_BATCH), "--hidden-size", "16",
        "--no-progress", "--precision", "no"]  # fp32: world-size changes are compared to float tolerance


def weights(run_dir, step=STEPS):
    return weights_at(run_dir, step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every recovered run must match bit for bit."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert_ok(run_here([*BASE, "--run-dir", str(run_dir)]))
    return weights(run_dir)


def signalled(args, line_prefix, signum, logs, **env):
    """``distseq ARGS``, sent ``signum`` once it prints a line starting with ``line_prefix``."""
    return run_until([*DISTSEQ, *args], line_prefix, lambda p: p.send_signal(signum), logs, env=cpu_env(**env))


def test_retention_keeps_the_newest(reference, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(run_here([*BASE, "--run-dir", str(run_dir)]))
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == [
        "step-00000030", "step-00000035", "step-00000040"]
    meta = json.loads((run_dir / "checkpoints" / "step-00000040" / "meta.json").read_text())
    assert meta["step"] == 40 and meta["samples"] == 40 * GLOBAL_BATCH and meta["world_size"] == 1
    assert meta["format_version"] == 2 and meta["sharding"] == "none"
    assert set(meta["versions"]) >= {"torch", "accelerate", "distseq"}
    assert_bit_identical(weights(run_dir), reference)  # a fresh run is deterministic


@pytest.mark.parametrize("kill", ["sigkill-after-step-15", "checkpoint-partial@20", "checkpoint-before-rename@30"])
def test_killed_run_resumes_bit_exact(kill, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = [*BASE, "--run-dir", str(run_dir)]
    if kill.startswith("sigkill"):
        code = signalled(args, "step=15/", signal.SIGKILL, tmp_path / "logs").returncode
    else:
        with Started([*DISTSEQ, *args], tmp_path / "logs", env=cpu_env(DISTSEQ_FAILPOINT=kill)) as proc:
            code = proc.finish().returncode
        debris = run_dir / "checkpoints" / f".tmp-step-{int(kill.split('@')[1]):08d}"
        assert debris.is_dir()  # died half-way through a save: the temporary directory is all that is left
    assert code == -signal.SIGKILL
    restarted = run_here(args)
    assert_ok(restarted)
    assert "resuming from" in restarted.stdout
    assert_bit_identical(weights(run_dir), reference)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_damaged_newest_checkpoint_is_reported_and_skipped(reference, tmp_path):
    run_dir = tmp_path / "run"
    args = [*BASE, "--run-dir", str(run_dir)]
    assert signalled(args, "step=25/", signal.SIGKILL, tmp_path / "logs").returncode == -signal.SIGKILL
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    weights_file = newest / "state" / "__0_0.distcp"  # the weights and optimizer state of the one rank
    weights_file.write_bytes(weights_file.read_bytes()[:100])  # truncated
    restarted = run_here(args)
    assert_ok(restarted)
    assert f"skipping checkpoint: {weights_file} does not match its sha256" in restarted.stdout
    step = int(newest.name.split("-")[1])
    assert f"resuming from {newest.with_name(f'step-{step - 5:08d}')}" in restarted.stdout
    assert_bit_identical(weights(run_dir), reference)


def as_version_1(checkpoint):
    """Rewrite a checkpoint of one process into the layout distseq wrote before DCP (format 1):
    model.safetensors (whole weights), trainer_state.pt ({"optimizer": the torch optimizer's
    state_dict, keyed by parameter position}), no state/, and meta.json's manifest to match."""
    model, optimizer = checkpoint_training_state(checkpoint)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
              checkpoint / "model.safetensors")
    torch.save({"optimizer": optimizer.state_dict()}, checkpoint / "trainer_state.pt")
    shutil.rmtree(checkpoint / "state")
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["format_version"] = 1
    meta.pop("sharding")  # version 1 had no such field
    kept = {name for name in meta["sha256"] if not name.startswith("state/")}  # rng-rank0.pt
    names = sorted(kept | {"model.safetensors", "trainer_state.pt"})
    meta["sha256"] = {name: hashlib.sha256((checkpoint / name).read_bytes()).hexdigest() for name in names}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_a_version_1_checkpoint_resumes_bit_exact(tmp_path):
    """A checkpoint in the layout before DCP (model.safetensors + trainer_state.pt) still resumes, to the
    same weights, bit for bit, as the run never interrupted."""
    whole, old = tmp_path / "whole", tmp_path / "old"
    args = [*BASE, "--max-steps", "8", "--checkpoint-every", "4"]
    assert_ok(run_here([*args, "--run-dir", str(whole)]))
    shutil.copytree(whole, old)
    step_4 = old / "checkpoints" / "step-00000004"
    reference_4 = checkpoint_weights(step_4)
    as_version_1(step_4)
    assert sorted(p.name for p in step_4.iterdir()) == ["meta.json", "model.safetensors", "rng-rank0.pt",
                                                        "trainer_state.pt"]
    assert_bit_identical(load_file(step_4 / "model.safetensors"), reference_4)
    shutil.rmtree(old / "checkpoints" / "step-00000008")

    resumed = run_here([*args, "--run-dir", str(old)])
    assert_ok(resumed)
    assert f"resuming from {step_4}" in resumed.stdout
    assert summary(old)["status"] == "complete" and summary(old)["step"] == 8
    assert json.loads((old / "checkpoints" / "step-00000008" / "meta.json").read_text())["format_version"] == 2
    assert_bit_identical(weights(old, 8), weights(whole, 8))


def test_sigterm_saves_exits_143_and_resumes_bit_exact(reference, tmp_path):
    run_dir = tmp_path / "run"
    args = [*BASE, "--run-dir", str(run_dir)]
    stopped = signalled(args, "step=15/", signal.SIGTERM, tmp_path / "logs")
    assert stopped.returncode == 143
    result = summary(run_dir)
    assert result["status"] == "preempted" and 15 <= result["step"] < STEPS
    saved = run_dir / "checkpoints" / f"step-{result['step']:08d}"
    assert f"SIGTERM: saved {saved} at step {result['step']}; exiting 143" in stopped.stdout
    assert (saved / "meta.json").is_file()
    assert_ok(run_here(args))
    assert summary(run_dir)["status"] == "complete"
    assert_bit_identical(weights(run_dir), reference)


def test_sigusr1_under_slurm_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.args"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {record}\n")
    (bin_dir / "scontrol").chmod(0o755)
    stopped = signalled([*BASE, "--run-dir", str(tmp_path / "run"), "--requeue"], "step=10/", signal.SIGUSR1,
                        tmp_path / "logs", SLURM_JOB_ID="4242", PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert stopped.returncode == 143 and "scontrol requeue 4242: ok" in stopped.stdout
    assert record.read_text().split() == ["requeue", "4242"]


def accelerate_launch_cmd(args):
    return [sys.executable, "-m", "accelerate.commands.launch", *two_process_args(), "-m", "distseq.cli", *args]


def digest_of(result):
    union = Digest()
    for part in result["data_accounting"]["per_rank"]:
        union = union.merge(Digest(**part))
    return union


@pytest.mark.multiproc
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_stream(first, second, reference, tmp_path):
    """Preempt on ``first`` processes (signal one rank), resume on ``second``: no sample twice, none skipped."""
    run_dir = tmp_path / "run"
    args = [*BASE, "--run-dir", str(run_dir), "--verify-data"]
    if first == 2:  # one rank only: all must agree to stop
        launched = run_until(accelerate_launch_cmd(args), "step=15/",
                             lambda p: p.ranks()[-1].send_signal(signal.SIGUSR1), tmp_path / "logs")
        assert "exitcode  : 143" in launched.stderr  # each rank saved and exited 143; the launcher reports it
    else:
        assert signalled(args, "step=15/", signal.SIGTERM, tmp_path / "logs").returncode == 143
    before = summary(run_dir)
    stopped = before["step"]
    assert before["status"] == "preempted" and before["world_size"] == first
    assert digest_of(before) == Digest.of_range(0, stopped * GLOBAL_BATCH)

    if second == 2:
        with Started(accelerate_launch_cmd(args), tmp_path / "logs") as launcher:
            assert_ok(launcher.finish())
    else:
        assert_ok(run_here(args))
    after = summary(run_dir)
    assert after["status"] == "complete" and after["world_size"] == second and after["step"] == STEPS
    assert after["resumed_from"].endswith(f"step-{stopped:08d}")
    assert digest_of(after) == Digest.of_range(stopped * GLOBAL_BATCH, STEPS * GLOBAL_BATCH)
    for key, value in weights(run_dir).items():  # another reduction order: equal up to float rounding
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5)


def adding_rows(path, rows, bad_row=None):
    generator = torch.Generator().manual_seed(0)
    with open(path, "w") as handle:
        for row in range(rows):
            values = torch.rand(6, generator=generator)
            label = float(values[0] + values[4]) if row != bad_row else 1e30  # a corrupt label: loss overflows
            handle.write(json.dumps({"sequence": [[v, float(i in (0, 4))] for i, v in enumerate(values.tolist())],
                                     "label": label}) + "\n")
    return path


FILE_ARGS = ["train", "--data-streaming", "--task", "adding", "--seq-len", "6", "--global-batch-size", "8",
             "--max-steps", "10", "--checkpoint-every", "2", "--log-every", "1", "--eval-every", "0",
             "--eval-size", "32",
             "--no-progress"]


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    data = adding_rows(tmp_path / "d.jsonl", 80, bad_row=27)  # rows 24..31 are step 4
    proc = run_here([*FILE_ARGS, "--data-files", str(data), "--run-dir", str(tmp_path / "run")])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "distseq train: error: non-finite loss or gradient at step 4; stopped without saving "
        "(--on-nonfinite skip skips such steps)"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002"]


def test_nonfinite_loss_skips_the_step_on_request(tmp_path):
    data = adding_rows(tmp_path / "d.jsonl", 80, bad_row=27)
    run_dir = tmp_path / "run"
    assert_ok(run_here([*FILE_ARGS, "--data-files", str(data), "--run-dir", str(run_dir), "--on-nonfinite", "skip"]))
    result = summary(run_dir)
    assert result["step"] == 10 and result["skipped_steps"] == 1

    skipped = dict(scalars(run_dir)["train/skipped_steps"])  # (step, cumulative count)
    assert skipped[3] == 0 and skipped[4] == 1 and skipped[10] == 1
    assert all(torch.isfinite(w).all() for w in weights(run_dir, 10).values())


@pytest.mark.multiproc
def test_a_hung_rank_fails_the_other_within_the_timeout(tmp_path):
    """Two nodes on loopback; node 1's rank freezes (SIGSTOP): node 0 must fail after --dist-timeout-s."""
    port = free_port()

    def node(rank):
        return Started([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                        "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                        "-m", "distseq.cli", "train", "--max-steps", "100000", "--log-every", "5", "--eval-every", "0",
                        "--eval-size", "64", "--global-batch-size", "64", "--hidden-size", "16", "--no-progress",
                        "--checkpoint-every", "0", "--dist-timeout-s", "8", "--run-dir", str(tmp_path / "run")],
                       tmp_path / "logs")

    with node(0) as main, node(1) as other:
        main.wait_for_line("step=20/")
        for p in other.children():
            p.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        ended = main.finish(timeout=120)
        waited = time.monotonic() - started
    err = ended.stderr
    assert ended.returncode == 1
    assert "distseq train: error: lost contact with another process" in err and "Timed out" in err
    assert 6 < waited < 60
    # the survivor's stacks: where it waited (the step's agreement, called from the loop) and every thread
    stacks = tmp_path / "run" / "hang-rank0.txt"
    assert f"this rank's Python stacks are in {stacks}" in err
    text = stacks.read_text()
    assert text.startswith("distseq: rank 0 of 2, pid ") and "Where this rank waited" in text
    assert 'distseq/training/loop.py", line' in text and "in run_loop" in text and "Timed out" in text
    assert "Every thread of this process now:" in text and "(most recent call first)" in text
    assert not (tmp_path / "run" / "hang-rank1.txt").exists()  # the frozen rank wrote nothing: the culprit
