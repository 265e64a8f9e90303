"""Real multi-process runs: gloo on loopback, started by accelerate launch."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch, assert_ok, run_distseq, summary, two_process_args
from distseq.accounting import Digest

pytestmark = pytest.mark.multiproc

ARGS = ["train", "--max-steps", "8", "--log-every", "4", "--eval-every", "4", "--eval-size", "301",
        "--global-batch-size", "64", "--no-progress", "--verify-data", "--grad-clip", "0"]


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
    assert_ok(run_distseq([*ARGS, "--run-dir", str(one)]))
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

    # only the main process writes: the same files as a one-process run, and each log line once
    assert files(two) == files(one)
    assert proc.stdout.count("step=4/8 train/loss=") == 1 and proc.stdout.count("distseq: done") == 1

    # same global batch on 1 or 2 processes: same weights up to float error, same held-out count
    a = load_file(one / "checkpoints" / "step-00000008" / "model.safetensors")
    b = load_file(two / "checkpoints" / "step-00000008" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert abs(summary(one)["eval/accuracy"] - result["eval/accuracy"]) < 1e-3
