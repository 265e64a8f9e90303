"""Real multi-process runs: gloo on loopback, started by accelerate launch."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO,
    accelerate_launch,
    assert_ok,
    checkpoint_weights,
    cpu_env,
    free_port,
    run_here,
    summary,
    two_process_args,
)

from distseq.data.verify import Digest

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

ARGS = ["train", "--max-steps", "8", "--log-every", "4", "--eval-every", "4", "--eval-size", "301",
        "--global-batch-size", "64", "--no-progress", "--verify-data", "--grad-clip", "0",
        "--precision", "no"]  # fp32: the weights of 1 and 2 processes are compared to float tolerance


def files(run_dir):
    """Relative paths a run wrote, with TensorBoard's time-stamped names reduced to their kind."""
    out = set()
    for path in run_dir.rglob("*"):
        if path.is_file():
            name = "events" if path.name.startswith("events.out.tfevents") else path.name
            out.add((len(path.relative_to(run_dir).parts), name))
    return out


def test_two_processes_share_the_stream_and_only_rank_0_writes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_here([*ARGS, "--run-dir", str(one)]))
    proc = accelerate_launch(two_process_args(), [*ARGS, "--run-dir", str(two)], timeout=180)
    assert_ok(proc)

    result = summary(two)
    assert result["world_size"] == 2 and result["backend"] == "gloo" and result["distributed_type"] == "MULTI_CPU"
    assert result["micro_batch"] == 32 and result["samples"] == 8 * 64

    # each rank consumed half of [0, 512), and together exactly [0, 512): disjoint and complete
    per_rank = [Digest(**d) for d in result["data_accounting"]["per_rank"]]
    assert [d.count for d in per_rank] == [256, 256]
    assert per_rank[0].merge(per_rank[1]) == Digest.of_range(0, 512)
    assert per_rank[0] != per_rank[1]

    # only the main process writes, but for each rank's own parts of the checkpoint (its RNG state, its
    # state/__{rank}_0.distcp); each log line once
    assert files(two) == files(one) | {(3, "rng-rank1.pt"), (4, "__1_0.distcp")}
    assert proc.stdout.count("step=4/8 train/loss=") == 1 and proc.stdout.count("distseq: done") == 1

    # same global batch on 1 or 2 processes: same weights up to float error, same held-out count
    a = checkpoint_weights(one / "checkpoints" / "step-00000008")
    b = checkpoint_weights(two / "checkpoints" / "step-00000008")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert abs(summary(one)["eval/accuracy"] - result["eval/accuracy"]) < 1e-3


def sum_sign_parquet(path, rows, seed):
    """A parquet file of sum-sign rows (labels follow the values, as stream_check verifies)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = torch.randn(rows, 6, generator=torch.Generator().manual_seed(seed))
    pq.write_table(pa.table({"sequence": x.tolist(), "label": (x.sum(1) > 0).long().tolist()}), path)
    return str(path)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_exact_sharding_across_ranks_and_workers(world_size, tmp_path):
    """Real ranks x DataLoader workers {0, 1, 3} x infinite/finite synthetic data and indexed files (60 + 40
    rows): every position exactly once, each epoch a permutation of the rows."""
    files = f"{sum_sign_parquet(tmp_path / 'a.parquet', 60, 1)},{sum_sign_parquet(tmp_path / 'b.parquet', 40, 2)}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(REPO / "tests" / "stream_check.py"),
           files]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=cpu_env(), cwd=REPO)
    cases = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(cases) == 9, proc.stdout + proc.stderr[-3000:]
    assert [case["source"] for case in cases].count("files") == 3
    for case in cases:
        assert case["world_size"] == world_size
        assert case["samples"] == 13 * 16 * world_size
        assert case["dataset_size"] in (None, 100)
        assert case["failures"] == [], case
    assert proc.returncode == 0


def test_a_token_task_on_two_processes_counts_every_token_once(tmp_path):
    """The decoder on mqar, 1 vs 2 processes: the same samples (digest), the same weights to float
    error, and the tokens and sequence accuracy summed over ranks (each rank counts its own)."""
    token_args = ["train", "--preset", "mqar", "--max-steps", "4", "--log-every", "2", "--eval-every", "4",
                  "--eval-size", "64", "--global-batch-size", "16", "--no-progress", "--verify-data",
                  "--grad-clip", "0", "--precision", "no"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_here([*token_args, "--run-dir", str(one)]))
    assert_ok(accelerate_launch(two_process_args(), [*token_args, "--run-dir", str(two)], timeout=180))
    first, second = summary(one), summary(two)
    assert second["world_size"] == 2 and first["world_size"] == 1
    assert first["tokens"] == second["tokens"] == 4 * 16 * 64  # steps x samples x seq 64 of the preset
    per_rank = [Digest(**d) for d in second["data_accounting"]["per_rank"]]
    assert per_rank[0].merge(per_rank[1]) == Digest.of_range(0, 4 * 16)
    a = checkpoint_weights(one / "checkpoints" / "step-00000004")
    b = checkpoint_weights(two / "checkpoints" / "step-00000004")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    for key in ("eval/accuracy", "eval/sequence_accuracy"):
        assert abs(first[key] - second[key]) < 1e-3, key
