"""Sharded training state: FSDP2 on CPU with real gloo processes, checkpoints that reshard, async saves.

Every run is real: torchrun (or accelerate launch) on loopback, SIGKILL from failpoints, DCP files on
disk. The model is a two-block causal decoder, so both block units and the root are sharded.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO,
    assert_bit_identical,
    assert_ok,
    checkpoint_weights,
    cpu_env,
    free_port,
    run_main,
    run_until,
    summary,
)

from distseq.config import TrainConfig
from distseq.data.verify import Digest
from distseq.errors import ConfigError

G = 12  # global batch: divisible by 1, 2 and 3 processes
BASE = ["train", "--model", "decoder", "--num-layers", "2", "--num-heads", "2", "--hidden-size", "16",
        "--global-batch-size", str(G), "--checkpoint-every", "4", "--keep-last", "0", "--log-every", "4",
        "--eval-every", "0", "--eval-size", "64", "--no-progress", "--precision", "no", "--verify-data"]


def torchrun(processes, args, *, env=None, timeout=240):
    """``torchrun --nproc_per_node N -m distseq.cli ARGS`` (1 process: still a launch, WORLD_SIZE=1)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "distseq.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cpu_env(**(env or {})), cwd=REPO)


def train(processes, run_dir, until, *extra, env=None):
    proc = torchrun(processes, [*BASE, "--run-dir", str(run_dir), "--max-steps", str(until), *extra], env=env)
    return proc


def assert_consumed(run_dir, start, until):
    """--verify-data: the ranks of this part consumed exactly the samples [start*G, until*G)."""
    report = summary(run_dir)["data_accounting"]
    merged = Digest()
    for digest in report["per_rank"]:
        merged = merged.merge(Digest(**digest))
    assert report["checked_until"] == until * G
    assert merged == Digest.of_range(start * G, until * G)


def assert_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def reshard_chain(tmp_path_factory):
    """One run resumed across layouts: FSDP on 2 -> FSDP on 3 -> DDP on 2 -> FSDP on 1 (a group of one)
    -> one plain process; and the same 20 steps uninterrupted on one process."""
    root = tmp_path_factory.mktemp("reshard")
    run, reference = root / "run", root / "reference"
    parts = [(2, 4, "fsdp"), (3, 8, "fsdp"), (2, 12, "ddp"), (1, 16, "fsdp"), (1, 20, "none")]
    outputs, start = [], 0
    for processes, until, sharding in parts:
        proc = train(processes, run, until, "--sharding", sharding)
        assert_ok(proc)
        assert summary(run)["sharding"] == sharding
        assert_consumed(run, start, until)
        outputs.append(proc.stdout)
        start = until
    assert_ok(train(1, reference, 20, "--sharding", "none"))
    return run, reference, outputs


@pytest.mark.multiproc
def test_a_checkpoint_resumes_on_any_layout_at_the_next_sample(reshard_chain):
    run, reference, outputs = reshard_chain
    assert "distseq: fsdp: 2 block(s) + root sharded over 2 process(es)" in outputs[0]
    assert "written by 2 process(es), sharding fsdp" in outputs[1]  # 2 FSDP ranks -> 3
    assert "written by 3 process(es), sharding fsdp" in outputs[2]  # FSDP -> DDP
    assert "written by 2 process(es), sharding ddp" in outputs[3]  # DDP -> FSDP
    assert "written by 1 process(es), sharding fsdp" in outputs[4]  # FSDP -> one plain process
    for step, processes, sharding in ((4, 2, "fsdp"), (8, 3, "fsdp"), (12, 2, "ddp"), (16, 1, "fsdp")):
        meta = json.loads((run / "checkpoints" / f"step-{step:08d}" / "meta.json").read_text())
        assert (meta["world_size"], meta["sharding"]) == (processes, sharding)
        assert {f"state/__{r}_0.distcp" for r in range(processes)} <= set(meta["sha256"])
    assert_close(checkpoint_weights(run / "checkpoints" / "step-00000020"),
                 checkpoint_weights(reference / "checkpoints" / "step-00000020"))


LOAD_AND_GATHER = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from distseq.checkpoint.format import read_meta
from distseq.inference.export import config_of
from distseq.models import build_model
from distseq.training.optim import build_optimizer
from distseq.registry import TASKS
from distseq.distributed.sharding import shard_model
from distseq.checkpoint.dcp import load_state

checkpoint, sharding, out = sys.argv[1:4]
meta, _ = read_meta(checkpoint)
cfg = config_of(meta["config"])
model = build_model(cfg.model, TASKS[cfg.data.task], cfg.task_spec())
if sharding == "fsdp":
    shard_model(model, "no", torch.device("cpu"))
elif sharding == "ddp":
    dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(model)
optimizer, _ = build_optimizer(model, cfg.optim, cfg.train.max_steps)
load_state(f"{checkpoint}/state", model, optimizer, None)
weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save({"weights": weights, "optim": optim}, out)
if dist.is_initialized():
    dist.destroy_process_group()
"""


@pytest.mark.multiproc
def test_loaded_state_equals_the_saved_state_exactly_on_every_layout(reshard_chain, tmp_path):
    """The FSDP checkpoint of 2 ranks loaded by 1 plain process, 3 FSDP ranks and 2 DDP ranks: the same
    weights as saved, bit for bit, and the same optimizer state on every layout."""
    run = reshard_chain[0]
    checkpoint = run / "checkpoints" / "step-00000004"
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_GATHER)
    loaded = {}
    for processes, sharding in ((1, "none"), (3, "fsdp"), (2, "ddp")):
        out = tmp_path / f"{sharding}.pt"
        cmd = [sys.executable, str(script), str(checkpoint), sharding, str(out)] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), str(script), str(checkpoint), sharding, str(out)]
        assert_ok(subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=cpu_env(), cwd=REPO))
        loaded[sharding] = torch.load(out, weights_only=True)
    saved = checkpoint_weights(checkpoint)
    for sharding, state in loaded.items():
        assert state["weights"].keys() == saved.keys()
        for key in saved:
            assert torch.equal(state["weights"][key], saved[key]), (sharding, key)
        for name, moments in state["optim"]["state"].items():
            assert int(moments["step"]) == 4
            for moment in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(moments[moment], loaded["none"]["optim"]["state"][name][moment]), (sharding, name)
    assert any(float(m["exp_avg"].abs().sum()) > 0 for m in loaded["fsdp"]["optim"]["state"].values())


@pytest.mark.multiproc
def test_fsdp_trains_as_ddp_does(reshard_chain, tmp_path):
    """The same 4 steps on 2 processes, sharded and replicated: the same weights up to float error."""
    run = reshard_chain[0]
    assert_ok(train(2, tmp_path / "ddp", 4, "--sharding", "ddp"))
    assert_close(checkpoint_weights(run / "checkpoints" / "step-00000004"),
                 checkpoint_weights(tmp_path / "ddp" / "checkpoints" / "step-00000004"))


@pytest.mark.multiproc
def test_a_sharded_checkpoint_exports_to_one_model(reshard_chain, tmp_path, capsys):
    from safetensors.torch import load_file

    from distseq import load_model

    checkpoint = reshard_chain[0] / "checkpoints" / "step-00000008"  # written by 3 FSDP ranks
    assert_ok(run_main(["export", "--checkpoint", checkpoint, "--out", tmp_path / "export"], capsys))
    exported = load_file(tmp_path / "export" / "model.safetensors")
    saved = checkpoint_weights(checkpoint)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    model = load_model(tmp_path / "export")
    x = torch.randn(3, 10, 1)
    assert model(x).shape[0] == 3
    result = run_main(["eval", "--run-dir", tmp_path / "none", "--checkpoint", checkpoint,
                       "--output", tmp_path / "eval.json"], capsys)
    assert_ok(result)
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 8


@pytest.fixture(scope="module")
def uninterrupted_fsdp(tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    assert_ok(train(2, run, 16, "--sharding", "fsdp", "--checkpoint-every", "4"))
    return checkpoint_weights(run / "checkpoints" / "step-00000016")


@pytest.mark.multiproc
@pytest.mark.parametrize("failpoint, mode", [
    ("checkpoint-background@8", "--async-checkpoint"),  # killed while step 8 is written in the background
    ("checkpoint-before-rename@8", "--no-async-checkpoint"),  # killed with every shard of step 8 written
])
def test_killed_while_saving_under_fsdp_resumes_bit_exact(uninterrupted_fsdp, tmp_path, failpoint, mode):
    run = tmp_path / "run"
    killed = train(2, run, 16, "--sharding", "fsdp", mode, env={"DISTSEQ_FAILPOINT": failpoint})
    assert killed.returncode != 0
    complete = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert complete == ["step-00000004"]  # step 8 was never named: the previous checkpoint is the newest
    assert (run / "checkpoints" / ".tmp-step-00000008").is_dir()
    resumed = train(2, run, 16, "--sharding", "fsdp", mode)
    assert_ok(resumed)
    assert "resuming from" in resumed.stdout and "step-00000004 (step 4," in resumed.stdout
    assert not (run / "checkpoints" / ".tmp-step-00000008").exists()
    assert_consumed(run, 4, 16)
    assert_bit_identical(checkpoint_weights(run / "checkpoints" / "step-00000016"), uninterrupted_fsdp)


def test_sharding_options_are_checked():
    cfg = TrainConfig()
    cfg.train.sharding = "zero3"
    with pytest.raises(ConfigError, match=r"--sharding: invalid choice 'zero3' \(choose from auto, none, ddp, fsdp\)"):
        cfg.validate()
    cfg.train.sharding = "none"
    with pytest.raises(ConfigError, match="--sharding: none trains on one process; this launch started 2"):
        cfg.validate(2)
    cfg.train.sharding, cfg.train.precision = "fsdp", "fp16"
    with pytest.raises(ConfigError, match="--precision: fp16 needs a gradient scaler"):
        cfg.validate(2)


def test_auto_sharding_follows_the_launch(monkeypatch):
    from distseq.config.world import resolve_sharding

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert (resolve_sharding("auto", 1), resolve_sharding("auto", 4)) == ("none", "ddp")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets under fsdp.yaml
    assert resolve_sharding("auto", 4) == "fsdp" and resolve_sharding("ddp", 4) == "ddp"


def test_a_forged_state_metadata_executes_nothing(tmp_path, capsys):
    """DCP's .metadata is a pickle: one that names anything but DCP's metadata classes is refused, and
    the code it carries never runs."""
    import hashlib
    import os
    import pickle

    run = tmp_path / "run"
    assert_ok(run_main(["train", "--preset", "seed", "--max-steps", "2", "--eval-every", "0", "--eval-size", "16",
                        "--no-progress", "--run-dir", run], capsys))
    checkpoint = run / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (checkpoint / "state" / ".metadata").write_bytes(pickle.dumps(Payload()))
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["sha256"]["state/.metadata"] = hashlib.sha256((checkpoint / "state" / ".metadata").read_bytes()).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    for args in (["eval", "--run-dir", run, "--checkpoint", checkpoint],
                 ["export", "--checkpoint", checkpoint, "--out", tmp_path / "export"],
                 ["train", "--preset", "seed", "--max-steps", "4", "--no-progress", "--run-dir", run]):
        result = run_main(args, capsys)
        assert result.returncode == 2, result.stderr
        assert "state/.metadata refers to posix.system, which a checkpoint never holds" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    def text(value):  # pickle's SHORT_BINUNICODE
        return b"\x8c" + bytes([len(value)]) + value.encode()

    # a dotted name inside an admitted module (pickle resolves it through the module's own imports)
    dotted = (b"\x80\x04" + text("torch.distributed.checkpoint.metadata") + text("os.system") + b"\x93"
              + text(f"touch {marker}") + b"\x85R.")
    (checkpoint / "state" / ".metadata").write_bytes(dotted)
    meta["sha256"]["state/.metadata"] = hashlib.sha256(dotted).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    result = run_main(["export", "--checkpoint", checkpoint, "--out", tmp_path / "export"], capsys)
    assert result.returncode == 2
    assert "refers to torch.distributed.checkpoint.metadata.os.system, which a checkpoint never holds" in result.stderr
    skipped = run_main(["eval", "--run-dir", run], capsys)  # choosing the newest: reported and skipped
    assert skipped.returncode == 2 and "distseq: skipping checkpoint: " in skipped.stdout
    assert "refers to torch.distributed.checkpoint.metadata.os.system" in skipped.stdout
    assert not marker.exists()


@pytest.mark.multiproc
def test_sigterm_with_a_background_save_in_flight_saves_and_resumes_bit_exact(uninterrupted_fsdp, tmp_path):
    """Preemption of a sharded run that saves in the background at every step (at most one in flight):
    every checkpoint is complete, with the run's history as of its own step though meta.json was written
    while later steps ran; the save in flight completes, the stop's own checkpoint is written, every
    rank exits 143; the resume ends bit-identical to the uninterrupted run with synchronous saves."""
    import os
    import signal

    from distseq.checkpoint.format import read_meta

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "distseq.cli", *BASE, "--run-dir", str(run), "--max-steps", "16",
           "--sharding", "fsdp", "--async-checkpoint", "--checkpoint-every", "1", "--log-every", "1",
           "--eval-every", "1"]
    # SLURM's preemption: SIGTERM to the launcher and both ranks
    ended = run_until(cmd, "step=6/", lambda p: os.killpg(p.pid, signal.SIGTERM), tmp_path / "logs", session=True)
    out, err = ended.stdout, ended.stderr
    result = summary(run)
    assert result["status"] == "preempted" and 6 <= result["step"] < 16, err[-3000:]
    saved = run / "checkpoints" / f"step-{result['step']:08d}"
    assert f"SIGTERM: saved {saved} at step {result['step']}; exiting 143" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in
                                                                       range(1, result["step"] + 1)]
    for step in range(1, result["step"] + 1):
        meta, _ = read_meta(run / "checkpoints" / f"step-{step:08d}")
        assert meta["step"] == step and meta["sharding"] == "fsdp"
        assert [e["step"] for e in meta["progress"]["eval_history"]] == list(range(1, step + 1))
    assert_ok(train(2, run, 16, "--sharding", "fsdp", "--async-checkpoint"))
    assert_bit_identical(checkpoint_weights(run / "checkpoints" / "step-00000016"), uninterrupted_fsdp)


@pytest.mark.multiproc
def test_a_version_1_checkpoint_resumes_under_fsdp(reshard_chain, tmp_path):
    """A checkpoint of the layout before DCP (whole weights, optimizer state by position) loads into FSDP
    shards on 2 ranks: the same order of tensors on every rank, the same training as from its DCP twin."""
    from test_recovery import as_version_1

    run = tmp_path / "run"
    shutil.copytree(reshard_chain[0], run)
    for later in (16, 20):
        shutil.rmtree(run / "checkpoints" / f"step-{later:08d}")
    step_12 = run / "checkpoints" / "step-00000012"  # written by 2 DDP ranks
    as_version_1(step_12)
    resumed = train(2, run, 16, "--sharding", "fsdp")
    assert_ok(resumed)
    assert f"resuming from {step_12} (step 12, {12 * G} samples, written by 2 process(es), sharding ddp)" in \
        resumed.stdout
    assert_consumed(run, 12, 16)
    assert_close(checkpoint_weights(run / "checkpoints" / "step-00000016"),
                 checkpoint_weights(reshard_chain[0] / "checkpoints" / "step-00000016"))


ONE_RANK_CANNOT_WRITE = """
import errno, json, sys, time
from datetime import timedelta
import torch
import torch.distributed as dist
from torch import nn
import distseq.checkpoint.writer as writer
from distseq.checkpoint.manager import CheckpointManager, RngState
from distseq.config import CheckpointConfig
from distseq.errors import RunIOError
from distseq.distributed.accelerator import fresh_accelerator

run_dir, asynchronous = sys.argv[1], sys.argv[2] == "async"
accelerator = fresh_accelerator()
rank = accelerator.process_index
written = writer.write_durably

def no_space_on_rank_1(path, data):  # this rank's disk is full; the other's is not
    if rank == 1:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return written(path, data)

writer.write_durably = no_space_on_rank_1
model = nn.Linear(4, 4)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 4)).sum().backward()
optimizer.step()
checkpoints = CheckpointManager(CheckpointConfig(async_checkpoint=asynchronous), accelerator=accelerator,
                                run_dir=run_dir, max_steps=1, samples_per_step=1, model=model, optimizer=optimizer,
                                timeout_s=60, meta={"config": {}}, per_rank={"rng": RngState()})
started = time.perf_counter()
try:
    checkpoints.save(1)
    checkpoints.wait()
    outcome = f"saved {checkpoints.newest}"
except RunIOError as error:
    outcome = f"RunIOError: {error}"
with open(f"{run_dir}/rank{rank}.json", "w") as out:
    json.dump({"outcome": outcome, "seconds": time.perf_counter() - started}, out)
accelerator.end_training()
"""


@pytest.mark.multiproc
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_one_rank_that_cannot_write_stops_every_rank_at_once(mode, tmp_path):
    """A full disk on one rank only: every rank raises the same RunIOError within seconds (no rank waits
    in DCP's collectives for the one that stopped), and nothing of the checkpoint is left."""
    script = tmp_path / "save.py"
    script.write_text(ONE_RANK_CANNOT_WRITE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(tmp_path), mode]
    assert_ok(subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=cpu_env(), cwd=REPO))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["outcome"].startswith("RunIOError: cannot write ") and "rng-rank1.pt: No space left" in \
        ranks[1]["outcome"]
    assert ranks[0]["outcome"].startswith("RunIOError: another process could not write its checkpoint files")
    assert all(rank["seconds"] < 30 for rank in ranks)  # the collectives' timeout is 60 s
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000001").exists()
    assert not (tmp_path / "checkpoints" / "step-00000001").exists()


def test_a_background_completion_that_raises_is_a_failure_not_a_checkpoint(tmp_path):
    """Whatever stops the background thread before the rename (here meta.json refusing a value JSON
    cannot hold) is the save's outcome: reported, no step-N, the temporary directory left as debris."""
    from torch import nn

    from distseq.checkpoint.format import list_checkpoints
    from distseq.checkpoint.manager import CheckpointManager
    from distseq.config import CheckpointConfig
    from distseq.distributed.accelerator import fresh_accelerator
    from distseq.errors import RunIOError

    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())

    def manager(config: dict) -> CheckpointManager:
        return CheckpointManager(CheckpointConfig(async_checkpoint=True), accelerator=fresh_accelerator(),
                                 run_dir=tmp_path, max_steps=10, samples_per_step=1, model=model, optimizer=optimizer,
                                 meta={"config": config})

    broken = manager({"train": {"not json": {1, 2}}})
    broken.save(3)
    with pytest.raises(RunIOError, match="the background checkpoint of step 3 failed: cannot complete the "
                                         "checkpoint: Object of type set is not JSON serializable"):
        broken.wait()
    assert list_checkpoints(tmp_path) == []
    ok = manager({"train": {}})
    ok.save(4)
    ok.wait()
    assert ok.newest.name == "step-00000004" and [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004"]


@pytest.mark.multiproc
def test_fsdp_computes_in_bf16_where_the_probe_allows_and_keeps_fp32_shards(tmp_path):
    """--precision auto under FSDP: bf16 compute exactly where this CPU runs it (the probe decides, never
    the test), fp32 reductions, and the saved shards stay fp32 (the policy casts, the state does not)."""
    from distseq.training.precision import cpu_has_native_bf16

    run = tmp_path / "run"
    proc = torchrun(2, [*[a for a in BASE if a not in ("--precision", "no")], "--precision", "auto", "--run-dir",
                        str(run), "--max-steps", "2", "--sharding", "fsdp"])
    assert_ok(proc)
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert f"compute {expected}, reductions fp32" in proc.stdout
    assert summary(run)["precision"] == ("bf16" if expected == "bf16" else "no")
    weights = checkpoint_weights(run / "checkpoints" / "step-00000002")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
