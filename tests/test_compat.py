"""What the release before this layout wrote still works: its checkpoints resume and its exports load.

tests/fixtures/release-0.1 was written by distseq at the commit in made-by.txt (before options moved to
their owners, when every saved config held every model's and task's options): the step-2 checkpoint of
three runs (a tied decoder on mqar, a bidirectional LSTM on sum-sign, a GRU on streamed files, whose
per-rank position was data-rank0.json), the whole weights that run reached at step 4
(weights-step-4.safetensors), and an export of the decoder at step 4. That release stepped the unfused
AdamW; this one steps the fused kernel (one pass over every parameter; it skips a non-finite step on the
device), whose operations round in another order: the resumed weights agree with the release's to float
rounding, not to the bit. Each run's step-00000002 is stored
beside its run dir's files rather than under checkpoints/ (which version control ignores everywhere); the
fixture puts it back where the release wrote it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_weights, run_main, summary
from safetensors.torch import load_file

RELEASE = Path(__file__).resolve().parent / "fixtures" / "release-0.1"
QUIET = ["--eval-every", "0", "--eval-size", "32", "--log-every", "2", "--no-progress", "--checkpoint-every", "2"]
RUNS = {  # each run's options then, as the resume repeats them
    "decoder-mqar": ["--preset", "mqar", "--seq-len", "16", "--vocab-size", "16", "--num-kv-pairs", "2",
                     "--hidden-size", "16", "--num-layers", "1", "--global-batch-size", "16", "--tie-embeddings"],
    "lstm-sum-sign": ["--seq-len", "6", "--hidden-size", "8", "--global-batch-size", "8", "--bidirectional",
                      "--log-with", "none"],
    "gru-streamed": ["--data-files", "rows.jsonl", "--data-streaming", "--seq-len", "4", "--hidden-size", "8",
                     "--model", "gru", "--global-batch-size", "4", "--log-with", "none"],
}


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A writable copy of the fixtures, as the working directory (the streamed run named rows.jsonl), in one
    thread as the fixtures were written (more threads sum a matmul in another order: not bit-exact)."""
    copy = tmp_path / "release"
    shutil.copytree(RELEASE, copy)
    for name in RUNS:
        (copy / name / "checkpoints").mkdir()
        (copy / name / "step-00000002").rename(copy / name / "checkpoints" / "step-00000002")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield copy
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(RUNS))
def test_a_checkpoint_of_the_release_before_resumes_where_it_left_off(name, release, capsys):
    proc = run_main(["train", *RUNS[name], *QUIET, "--max-steps", "4", "--run-dir", name], capsys)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {release / name / 'checkpoints' / 'step-00000002'}" in proc.stdout
    assert "changed on resume" not in proc.stdout  # the same options, in the new layout
    want = load_file(release / name / "weights-step-4.safetensors")
    got = checkpoint_weights(release / name / "checkpoints" / "step-00000004")
    assert sorted(got) == sorted(want)
    for key in want:  # two fused AdamW steps from the same state: float rounding apart, not a different run
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)
    assert summary(release / name)["step"] == 4


def test_a_changed_identity_option_is_refused_against_an_old_checkpoint(release, capsys):
    args = [a if a != "--tie-embeddings" else "--no-tie-embeddings" for a in RUNS["decoder-mqar"]]
    proc = run_main(["train", *args, *QUIET, "--max-steps", "4", "--run-dir", "decoder-mqar"], capsys)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("was written with --tie-embeddings True; this run has False (resume with "
                                        "the same value, or --resume never in a new --run-dir)")


def test_eval_predict_and_export_read_an_old_checkpoint(release, capsys):
    checkpoint = release / "decoder-mqar" / "checkpoints" / "step-00000002"
    ran = run_main(["eval", "--run-dir", "decoder-mqar", "--output", "eval.json"], capsys)
    assert ran.returncode == 0, ran.stderr
    assert json.loads((release / "eval.json").read_text())["step"] == 2
    predicted = run_main(["predict", "--checkpoint", checkpoint, "--random", "3"], capsys)
    assert predicted.returncode == 0 and len(predicted.stdout.splitlines()) == 3
    exported = run_main(["export", "--checkpoint", checkpoint, "--out", "new-export"], capsys)
    assert exported.returncode == 0, exported.stderr
    saved = json.loads((release / "new-export" / "config.json").read_text())
    # the new layout: a model's and a task's own options only
    assert saved["model"] == {"kind": "decoder", "hidden_size": 16, "num_layers": 1, "dropout": 0.0, "num_heads": 2,
                              "positions": "rope", "tie_embeddings": True, "short_conv": 0}
    assert saved["data"] == {"task": "mqar", "seq_len": 16, "min_seq_len": None, "vocab_size": 16, "num_kv_pairs": 2}


def test_an_old_export_loads_and_computes_what_its_checkpoint_does(release):
    import distseq
    from distseq.inference.export import build_from, config_of

    model = distseq.load_model(release / "decoder-export")
    assert model.distseq_config["model"]["bidirectional"] is False  # written then, for every model
    meta = json.loads((release / "decoder-mqar" / "checkpoints" / "step-00000002" / "meta.json").read_text())
    cfg = config_of(meta["config"])
    assert cfg.model.positions == "rope" and cfg.model.tie_embeddings and cfg.data.num_kv_pairs == 2
    at_4 = build_from(cfg, load_file(release / "decoder-mqar" / "weights-step-4.safetensors"))
    x = torch.randint(0, 16, (3, 16))
    torch.testing.assert_close(model(x), at_4(x), rtol=0, atol=0)


def test_no_fixture_file_is_ignored_by_version_control():
    """A fixture that .gitignore matches exists only in the tree that wrote it: a fresh clone lacks it."""
    root = RELEASE.parents[2]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(root)) for p in RELEASE.rglob("*") if p.is_file()]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=root, capture_output=True, text=True)
    assert ignored.stdout == "", f"ignored by .gitignore: {ignored.stdout}"
