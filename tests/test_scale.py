"""Scale rehearsal: 8 gloo ranks preempted at a random step, resumed on 5 ranks, nothing lost or repeated.

One run goes through what a cluster job does when it is preempted and requeued on a different number of
processes, with real processes throughout (torchrun, gloo on loopback, SIGTERM from outside):

- torchrun starts 8 ranks and distseq checks it got exactly those (``--expect-world-size 8``);
- SIGTERM reaches every rank after a randomly chosen step K: the ranks agree at the next step boundary
  S > K, every rank writes its shard of the checkpoint step-S (8 ``.distcp`` files, each matching its
  sha256 in meta.json), summary.json says "preempted" at step S, every rank exits 143 and torchrun, whose
  workers failed, exits 1;
- the same command on 5 ranks (``--expect-world-size 5``) resumes that checkpoint, says it was written
  by 8 processes, continues the step counter at S+1 and completes at step M;
- ``--verify-data`` proves the 8 ranks consumed samples [0, S*G) and the 5 ranks [S*G, M*G), each
  sample exactly once, in equal shares per rank; the training loss is finite at every step.

K is random because any step must work; the test prints it, and DISTSEQ_TEST_PREEMPT_STEP=K reruns it.
"""

import json
import math
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import Started, free_port, summary

from distseq.checkpoint.format import read_meta
from distseq.data.verify import Digest

G = 40  # global batch: divisible by both 8 and 5 ranks (micro-batches of 5 and of 8)
MAX_STEPS = 30  # M: far enough past the latest preemption point that the stop always lands before it
LATEST_PREEMPTION = 10  # K is drawn from [1, 10]
CHECKPOINT_EVERY = 4
ARGS = ["train", "--hidden-size", "8", "--global-batch-size", str(G), "--precision", "no", "--eval-size", "40",
        "--eval-every", "0", "--log-every", "1", "--checkpoint-every", str(CHECKPOINT_EVERY), "--keep-last", "0",
        "--no-progress", "--verify-data", "--max-steps", str(MAX_STEPS)]


def torchrun(processes: int, args: list, logs: Path) -> Started:
    """``torchrun --nproc_per_node N -m distseq.cli ARGS`` (stdout and stderr in files under ``logs``). torchrun
    starts each rank in a session of its own: leaving the ``with`` block kills every process it started."""
    return Started([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "distseq.cli", *args,
                    "--expect-world-size", str(processes)], logs)


def consumed(result: dict) -> Digest:
    """The union of the sample indices every rank consumed, as --verify-data recorded it."""
    union = Digest()
    for part in result["data_accounting"]["per_rank"]:
        union = union.merge(Digest(**part))
    return union


def per_rank_counts(result: dict) -> list:
    return [part["count"] for part in result["data_accounting"]["per_rank"]]


def train_losses(stdout: str) -> dict:
    """``{step: train/loss}`` from the main process's log lines (``step=5/30 train/loss=0.6998 ...``)."""
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step=(\d+)/\d+ train/loss=(\S+)", stdout, re.M)}


def checkpoint_names(run_dir: Path) -> list:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def preemption_step() -> int:
    """K, the step after whose log line the ranks get SIGTERM: random (seeded from the OS) unless
    DISTSEQ_TEST_PREEMPT_STEP names it, so that a failure at one K can be rerun."""
    if os.environ.get("DISTSEQ_TEST_PREEMPT_STEP"):
        return int(os.environ["DISTSEQ_TEST_PREEMPT_STEP"])
    return random.Random(os.urandom(16)).randint(1, LATEST_PREEMPTION)


@pytest.mark.multiproc
@pytest.mark.timeout(450)  # each phase has its own limit below (390 s in all); this is the backstop
def test_preempted_on_8_ranks_resumes_on_5_consuming_every_sample_once(tmp_path):
    run_dir = tmp_path / "run"
    args = [*ARGS, "--run-dir", str(run_dir)]
    k = preemption_step()
    print(f"scale rehearsal: SIGTERM to every rank after step {k} (rerun with DISTSEQ_TEST_PREEMPT_STEP={k})")

    # --- 8 ranks, preempted after step K ---
    started = time.monotonic()
    with torchrun(8, args, tmp_path / "logs") as launch:
        launch.wait_for_line(f"step={k}/", timeout=150)  # 8 ranks importing torch on 2 cores: ~15 s
        ranks = launch.ranks()
        # Every rank gets the signal itself, not through the launcher. torchrun does forward a SIGTERM
        # it receives, but then gives its workers --shutdown_timeout (30 s) before a SIGKILL and exits
        # through its own SignalException without reporting any worker's exit code: a rank that crashed
        # or was killed would pass unseen. Signalled directly (as SLURM signals every process of a job
        # step), the ranks stop on their own and torchrun's failure report names each one's exit code.
        # When the first rank exits, torchrun sends SIGTERM to those still running (harmless: they are
        # stopping on the first one already) and SIGKILLs any left 30 s later: a -9 below is a rank
        # that hung at exit.
        for rank in ranks:
            rank.send_signal(signal.SIGTERM)
        done = launch.finish(timeout=90)  # > torchrun's 30 s shutdown
    code, out, err = done.returncode, done.stdout, done.stderr
    preempted_seconds = time.monotonic() - started
    assert len(ranks) == 8, f"torchrun started {len(ranks)} rank processes: {[r.pid for r in ranks]}"
    assert "distseq: world_size=8 backend=gloo" in out, out[-3000:]

    # torchrun exits 1 when workers fail, whatever their code: 143 does not pass through the launcher,
    # so a scheduler tells a preemption from a crash by summary.json (or the report below), not by it.
    assert code == 1, f"torchrun exited {code}\n{err[-3000:]}"
    reported = {int(rank): int(exit_code) for rank, exit_code in
                re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", err)}
    # recent torch (2.13 here) reports every rank; older versions only those that had exited when torchrun
    # looked (the 8 shards below prove the others saved too). Whichever it lists: 143, no crash, no kill.
    assert reported and set(reported) <= set(range(8)), err[-3000:]
    assert set(reported.values()) == {143}, f"rank exit codes reported by torchrun: {reported}"

    before = summary(run_dir)
    s = before["step"]
    print(f"scale rehearsal: stopped at step {s}; ranks' exit codes {reported}; {preempted_seconds:.1f} s")
    # the step in flight when the signal arrived completes; the ranks stop at the boundary after it
    assert before["status"] == "preempted" and k < s < MAX_STEPS, (k, before["status"], s)
    saved = run_dir / "checkpoints" / f"step-{s:08d}"
    assert f"distseq: SIGTERM: saved {saved} at step {s}; exiting 143\n" in out
    assert before["world_size"] == 8 and before["samples"] == s * G and before["checkpoint"] == str(saved)

    # every periodic checkpoint and the stop's own, all complete: no half-written .tmp-step-* left
    assert checkpoint_names(run_dir) == sorted({f"step-{n:08d}" for n in range(CHECKPOINT_EVERY, s + 1,
                                                                              CHECKPOINT_EVERY)} | {saved.name})
    meta, _ = read_meta(saved)  # every file matches its sha256 in meta.json
    assert (meta["step"], meta["samples"], meta["world_size"]) == (s, s * G, 8)
    shards = {f"__{r}_0.distcp" for r in range(8)}
    assert {p.name for p in (saved / "state").glob("*.distcp")} == shards  # every rank wrote its own
    assert {f"state/{name}" for name in shards} | {f"rng-rank{r}.pt" for r in range(8)} <= set(meta["sha256"])

    assert before["data_accounting"]["checked_until"] == s * G
    assert consumed(before) == Digest.of_range(0, s * G)
    assert per_rank_counts(before) == [s * G // 8] * 8
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, s + 1)) and all(math.isfinite(v) for v in losses.values()), losses

    # --- the same command on 5 ranks: resumes at step S, completes at M ---
    started = time.monotonic()
    with torchrun(5, args, tmp_path / "logs") as launch:
        done = launch.finish(timeout=150)
        assert done.returncode == 0, launch.describe()
    out = done.stdout
    resumed_seconds = time.monotonic() - started
    assert "distseq: world_size=5 backend=gloo" in out, out[-3000:]
    assert (f"distseq: resuming from {saved} (step {s}, {s * G} samples, written by 8 process(es), "
            f"sharding ddp)") in out

    after = summary(run_dir)
    print(f"scale rehearsal: resumed on 5 ranks to step {after['step']}; {resumed_seconds:.1f} s")
    assert after["status"] == "complete" and after["step"] == MAX_STEPS and after["world_size"] == 5
    assert after["samples"] == MAX_STEPS * G and after["resumed_from"] == str(saved)
    assert after["data_accounting"]["checked_until"] == MAX_STEPS * G
    assert consumed(after) == Digest.of_range(s * G, MAX_STEPS * G)  # each sample once, none skipped
    assert per_rank_counts(after) == [(MAX_STEPS - s) * G // 5] * 5
    losses = train_losses(out)
    assert sorted(losses) == list(range(s + 1, MAX_STEPS + 1)), losses  # the counter continues at S+1
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert math.isfinite(after["eval/loss"])
    final = json.loads((run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}" / "meta.json").read_text())
    assert (final["step"], final["world_size"]) == (MAX_STEPS, 5)
