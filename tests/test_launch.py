"""Every way to launch: each file in accelerate_configs/, multi-node on loopback, the precision probe."""

import json
import re
import subprocess
import sys

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from conftest import REPO, accelerate_launch, assert_ok, checkpoint_weights, cpu_env, free_port, run_here, summary

from distseq.config import TrainConfig
from distseq.registry import MODELS
from distseq.training.precision import cpu_has_native_bf16, resolve_precision, runs_under

pytestmark = pytest.mark.slow  # real training runs: left out of the fast tier (-m 'not slow')

CONFIGS = REPO / "accelerate_configs"
ARGS = ["train", "--max-steps", "6", "--log-every", "3", "--eval-every", "0", "--eval-size", "64",
        "--global-batch-size", "32", "--hidden-size", "16", "--no-progress", "--precision", "no", "--grad-clip", "0"]

# what a real launch of each CPU config must produce: (world_size, backend, distributed_type)
CPU_LAUNCHES = {"cpu.yaml": (1, "none", "NO"), "cpu_2proc.yaml": (2, "gloo", "MULTI_CPU")}
# the fields each GPU-only config must declare, checked with accelerate's own loader
GPU_FIELDS = {
    "single_gpu.yaml": {"distributed_type": "NO", "num_processes": 1, "mixed_precision": "bf16", "use_cpu": False},
    "multi_gpu.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 1, "mixed_precision": "bf16"},
    "multi_node.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 2, "rdzv_backend": "static"},
    "fsdp.yaml": {"distributed_type": "FSDP", "mixed_precision": "bf16"},
}


def test_every_config_is_covered_and_documented():
    files = {p.name for p in CONFIGS.glob("*.yaml")}
    assert files == set(CPU_LAUNCHES) | set(GPU_FIELDS)
    for name in files:
        text = (CONFIGS / name).read_text()
        assert text.startswith("#") and "accelerate launch --config_file accelerate_configs/" + name in text


@pytest.mark.multiproc
@pytest.mark.parametrize("name", sorted(CPU_LAUNCHES))
def test_cpu_config_launches_for_real(name, tmp_path):
    world, backend, kind = CPU_LAUNCHES[name]
    proc = accelerate_launch(["--config_file", str(CONFIGS / name), "--main_process_port", str(free_port())],
                             [*ARGS, "--run-dir", str(tmp_path / "run"), "--expect-world-size", str(world)])
    assert_ok(proc)
    result = summary(tmp_path / "run")
    assert (result["world_size"], result["backend"], result["distributed_type"]) == (world, backend, kind)
    assert f"distseq: world_size={world} backend={backend}" in proc.stdout


@pytest.mark.parametrize("name", sorted(GPU_FIELDS))
def test_gpu_config_loads_with_accelerates_loader(name):
    config = load_config_from_file(str(CONFIGS / name))
    for field, value in GPU_FIELDS[name].items():
        actual = getattr(config, field)
        assert (actual.value if hasattr(actual, "value") else actual) == value, field
    assert config.num_processes >= config.num_machines
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_version"] == 2


@pytest.mark.multiproc
def test_the_fsdp_config_launches_sharded_training_on_cpu(tmp_path):
    """fsdp.yaml on a CPU machine: two gloo ranks whose parameters distseq shards with FSDP2."""
    proc = accelerate_launch(["--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2",
                              "--main_process_port", str(free_port())],
                             [*ARGS, "--run-dir", str(tmp_path / "run"), "--expect-world-size", "2"])
    assert_ok(proc)
    result = summary(tmp_path / "run")
    assert (result["world_size"], result["backend"], result["sharding"]) == (2, "gloo", "fsdp")
    assert "sharding=fsdp" in proc.stdout and "distseq: fsdp: " in proc.stdout
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / "meta.json").read_text())
    assert meta["sharding"] == "fsdp" and {"state/__0_0.distcp", "state/__1_0.distcp"} <= set(meta["sha256"])


@pytest.mark.multiproc
def test_a_launch_with_fewer_ranks_than_asked_is_an_error(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process on a CPU machine: say so."""
    proc = accelerate_launch(["--cpu", "--num_processes", "2", "--main_process_port", str(free_port())],
                             [*ARGS, "--run-dir", str(tmp_path / "run"), "--expect-world-size", "2"])
    assert proc.returncode != 0 and "returned non-zero exit status 2" in proc.stderr  # the launcher relays our exit 2
    assert "--expect-world-size: asked for 2 processes, the launch produced 1" in proc.stderr
    assert "use --multi_gpu" in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.multiproc
def test_two_nodes_on_loopback_train_together(tmp_path):
    """multi_node.yaml for real: two launcher invocations (machine ranks 0 and 1) on 127.0.0.1."""
    port = free_port()
    nodes = []
    for machine_rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_node.yaml"),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "-m", "distseq.cli", *ARGS, "--run-dir", str(tmp_path / "two"), "--verify-data"]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=cpu_env(), cwd=REPO))
    outputs = [node.communicate(timeout=180) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "distseq: done" in outputs[0][0] and "distseq: done" not in outputs[1][0]  # only rank 0 reports
    result = summary(tmp_path / "two")
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert [d["count"] for d in result["data_accounting"]["per_rank"]] == [96, 96]
    assert_ok(run_here([*ARGS, "--run-dir", str(tmp_path / "one")]))
    a = checkpoint_weights(tmp_path / "one" / "checkpoints" / "step-00000006")
    b = checkpoint_weights(tmp_path / "two" / "checkpoints" / "step-00000006")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_probe_table_covers_the_cpu_rows(tmp_path):
    proc = run_here(["probe", "--hidden-size", "16", "--global-batch-size", "32", "--json", str(tmp_path / "p.json")])
    assert_ok(proc)
    rows = {(r["model"], r["precision"]): r for r in json.loads((tmp_path / "p.json").read_text())}
    kinds = MODELS.names()  # every registered model, the sequence mixers too
    assert "mamba" in kinds and set(rows) == {(m, p) for m in kinds for p in ("no", "bf16", "fp16")}
    for kind in kinds:
        assert rows[(kind, "no")]["works"] and rows[(kind, "no")]["ms_per_step"] > 0
        assert not rows[(kind, "fp16")]["works"] and "not on CPU" in rows[(kind, "fp16")]["error"]
    assert re.search(r"^lstm +fp16 +error +- +not on CPU", proc.stdout, re.M), proc.stdout


def test_lstm_under_cpu_fp16_autocast_fails_and_the_probe_says_so():
    cfg = TrainConfig()
    cfg.model.kind = "lstm"
    assert "could not create a primitive descriptor" in runs_under("fp16", cfg, torch.device("cpu"))
    assert runs_under("no", cfg, torch.device("cpu")) == ""


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_auto_on_cpu_picks_bf16_only_where_it_runs(kind):
    cfg = TrainConfig()
    cfg.model.kind = kind
    chosen = resolve_precision("auto", cfg, torch.device("cpu"))
    runs = cpu_has_native_bf16() and runs_under("bf16", cfg, torch.device("cpu")) == ""
    assert chosen.name == ("bf16" if runs else "no") and chosen.reason.startswith("auto on CPU")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_picks_a_working_autocast():
    cfg = TrainConfig()
    chosen = resolve_precision("auto", cfg, torch.device("cuda", 0))
    assert chosen.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert runs_under(chosen.name, cfg, torch.device("cuda", 0)) == ""


def test_gpu_check_says_when_there_is_no_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: launch/gpu-check runs for real there")
    proc = subprocess.run([str(REPO / "launch" / "gpu-check"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, env=cpu_env())
    assert proc.returncode == 3 and "gpu-check: no CUDA device" in proc.stderr


def test_summary_reports_peak_memory(tmp_path):
    assert_ok(run_here([*ARGS, "--run-dir", str(tmp_path / "run")]))
    assert 50 < summary(tmp_path / "run")["peak_rss_mb"] < 8000
