"""Use after training: the transformer's accuracy, eval on N processes, predict, export, the Python API."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, accelerate_launch, assert_ok, cpu_env, run_here, summary, two_process_args

from distseq import load_model
from distseq.cli import main
from distseq.inference.export import model_from_checkpoint

pytestmark = pytest.mark.slow  # real training runs: left out of the fast tier (-m 'not slow')

TRAIN = ["train", "--no-progress", "--eval-every", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small LSTM run with a checkpoint at step 200."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert_ok(run_here([*TRAIN, "--run-dir", str(run_dir), "--max-steps", "200", "--eval-size", "512"]))
    return run_dir


def test_transformer_learns_sum_sign_to_99_percent(tmp_path):
    proc = run_here([*TRAIN, "--model", "transformer", "--max-steps", "600", "--run-dir", str(tmp_path)])
    assert_ok(proc)
    assert summary(tmp_path)["eval/accuracy"] >= 0.99


def test_transformer_learns_copy_at_a_short_delay(tmp_path):
    proc = run_here([*TRAIN, "--model", "transformer", "--task", "copy", "--seq-len", "12", "--copy-len", "3",
                        "--max-steps", "200", "--run-dir", str(tmp_path)])
    assert_ok(proc)
    assert summary(tmp_path)["eval/accuracy"] >= 0.99  # symbols recalled after 5 blank steps


@pytest.mark.multiproc
def test_eval_on_two_processes_counts_every_sample_once(trained, tmp_path):
    assert_ok(run_here(["eval", "--run-dir", str(trained), "--eval-size", "1001"]))
    one = json.loads((trained / "eval.json").read_text())
    proc = accelerate_launch(two_process_args(), ["eval", "--run-dir", str(trained), "--eval-size", "1001"])
    assert_ok(proc)
    two = json.loads((trained / "eval.json").read_text())
    assert one["samples"] == two["samples"] == 1001 and two["world_size"] == 2
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["step"] == 200 and two["checkpoint"].endswith("step-00000200")


def test_eval_on_data_files(trained, tmp_path):
    rows = [{"sequence": [1.0] * 10, "label": 1}, {"sequence": [-1.0] * 10, "label": 0}] * 5
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_ok(run_here(["eval", "--run-dir", str(trained), "--data-files", str(data)]))
    result = json.loads((trained / "eval.json").read_text())
    assert result["samples"] == 10 and result["accuracy"] == 1.0


def test_predict_random_and_from_a_file(trained, tmp_path):
    checkpoint = str(trained / "checkpoints" / "step-00000200")
    proc = run_here(["predict", "--checkpoint", checkpoint, "--random", "50"])
    assert_ok(proc)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 50 and all(0 <= r["probability"] <= 1 and r["class"] in (0, 1) for r in lines)
    assert sum(r["class"] == r["label"] for r in lines) >= 40

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"sequence": [1.0] * 10}) + "\n" + json.dumps({"sequence": [-2.0] * 10}) + "\n")
    out = tmp_path / "out.jsonl"
    assert_ok(run_here(["predict", "--checkpoint", checkpoint, "--input", str(data), "--output", str(out)]))
    assert [json.loads(line)["class"] for line in out.read_text().splitlines()] == [1, 0]


@pytest.mark.parametrize("line,message", [
    ('{"sequence": [1, 2, 3]}', "line 2: sequence length 3, expected 10"),
    ('{"sequence": [1, "a", 3, 4, 5, 6, 7, 8, 9, 10]}', "line 2: 'sequence' is not a list of numbers"),
    ('{"seq": [1, 2]}', "line 2: missing 'sequence'"),
    ('{"sequence": [1, 2,', "line 2: not valid JSON"),
])
def test_predict_bad_line_names_it_and_writes_nothing(line, message, trained, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"sequence": [0.5] * 10}) + "\n" + line + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--checkpoint", str(trained / "checkpoints" / "step-00000200"), "--input", str(data),
              "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and f"{data}: {message}" in err, err
    assert not out.exists() and not list(tmp_path.glob("out.jsonl*"))


def test_export_gives_the_training_time_logits(trained, tmp_path):
    checkpoint = trained / "checkpoints" / "step-00000200"
    assert_ok(run_here(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]))
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"model.safetensors", "config.json"}
    exported = load_model(tmp_path / "export")
    original, _, _ = model_from_checkpoint(checkpoint)
    x = torch.randn(64, 10, 1)
    with torch.no_grad():
        assert torch.equal(exported(x), original(x))
    assert exported.distseq_config["data"]["task"] == "sum-sign" and exported.distseq_config["step"] == 200
    # no trainer, no accelerate: a fresh interpreter that never imports them
    code = (f"import sys, torch, distseq; m = distseq.load_model({str(tmp_path / 'export')!r}); "
            "m(torch.zeros(1, 10, 1)); assert 'accelerate' not in sys.modules "
            "and 'distseq.training.loop' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], env=cpu_env(), capture_output=True).returncode == 0


def test_print_config_shows_the_resolved_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  kind: gru\noptim:\n  lr: 0.5\n")
    proc = run_here(["train", "--preset", "seed", "--config", str(config), "--lr", "0.1", "--print-config"])
    assert_ok(proc)
    resolved = json.loads(proc.stdout)
    assert resolved["model"]["kind"] == "gru" and resolved["optim"]["lr"] == 0.1
    assert resolved["data"]["dataset_size"] == 1000  # from the preset


def test_readme_python_api_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    example = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    assert len(example.strip().splitlines()) <= 6
    proc = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=cpu_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    accuracy = float(proc.stdout.strip().splitlines()[-1])  # the example's own print
    assert 0.5 < accuracy <= 1.0 and (tmp_path / "runs" / "api" / "summary.json").is_file()
