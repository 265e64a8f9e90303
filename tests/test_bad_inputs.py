"""A table of wrong inputs: each is one line naming the problem, a non-zero exit, and no file touched.

Every case runs against a copy of a finished run directory with checkpoints, hashed before and after.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY, assert_ok, run_distseq
from distseq.cli import main

CKPT = "checkpoints/step-00000006"


def setup_nothing(run: Path, tmp: Path) -> None:
    pass


def truncate_weights(run: Path, tmp: Path) -> None:
    path = run / CKPT / "model.safetensors"
    path.write_bytes(path.read_bytes()[:64])


def wrong_sha(run: Path, tmp: Path) -> None:
    meta = json.loads((run / CKPT / "meta.json").read_text())
    meta["sha256"]["trainer_state.pt"] = "0" * 64
    (run / CKPT / "meta.json").write_text(json.dumps(meta))


def newer_format(run: Path, tmp: Path) -> None:
    meta = json.loads((run / CKPT / "meta.json").read_text())
    meta["format_version"] = 99
    (run / CKPT / "meta.json").write_text(json.dumps(meta))


def meta_not_json(run: Path, tmp: Path) -> None:
    (run / CKPT / "meta.json").write_text("{not json")


def meta_missing(run: Path, tmp: Path) -> None:
    (run / CKPT / "meta.json").unlink()


def a_file(name: str, text: str):
    def make(run: Path, tmp: Path) -> None:
        (tmp / name).write_text(text)
    return make


R = "{run}"  # replaced by the run directory
C = "{run}/" + CKPT  # ... and its checkpoint
T = "{tmp}"  # a scratch directory beside it

# (case, extra arguments, setup, exit code, text the one-line message must contain)
CASES = [
    ("negative lr", ["--lr", "-1"], setup_nothing, 2, "--lr: must be a finite number > 0"),
    ("unknown model", ["--model", "cnn"], setup_nothing, 2, "--model: invalid choice 'cnn'"),
    ("zero hidden", ["--hidden-size", "0"], setup_nothing, 2, "--hidden-size: must be an integer >= 1"),
    ("non-integer steps", ["--max-steps", "ten"], setup_nothing, 2, "argument --max-steps: invalid int value"),
    ("batch not divisible", ["--global-batch-size", "100", "--grad-accum-steps", "3"], setup_nothing, 2,
     "--global-batch-size: 100 is not divisible"),
    ("fp16 on cpu", ["--precision", "fp16"], setup_nothing, 2, "--precision: fp16 does not run on CPU"),
    ("bad on-nonfinite", ["--on-nonfinite", "ignore"], setup_nothing, 2, "--on-nonfinite: invalid choice"),
    ("negative keep-last", ["--keep-last", "-1"], setup_nothing, 2, "--keep-last: must be an integer >= 0"),
    ("zero timeout", ["--dist-timeout-s", "0"], setup_nothing, 2, "--dist-timeout-s: must be an integer >= 1"),
    ("min above max length", ["--min-seq-len", "20"], setup_nothing, 2, "--min-seq-len: 20 is longer than --seq-len"),
    ("start-step with resume", ["--start-step", "3"], setup_nothing, 2, "--start-step: starts a fresh run"),
    ("resume path missing", ["--resume", "/no/such/checkpoint"], setup_nothing, 2, "--resume: expected auto, never"),
    ("run dir is a file", ["--run-dir", T + "/plain"], a_file("plain", "data"), 2, "--run-dir: " ),
    ("run dir unwritable", ["--run-dir", "/proc/distseq-test/run"], setup_nothing, 2, "--run-dir: cannot write to"),
    ("different model shape", ["--hidden-size", "32"], setup_nothing, 2,
     "was written with --hidden-size 16; this run has 32"),
    ("different data", ["--seq-len", "12"], setup_nothing, 2, "was written with --seq-len 10; this run has 12"),
    ("different global batch", ["--global-batch-size", "128"], setup_nothing, 2,
     "was written with --global-batch-size 64; this run has 128"),
    ("truncated weights", ["--resume", C], truncate_weights, 2, "model.safetensors does not match its sha256"),
    ("wrong sha256", ["--resume", C], wrong_sha, 2, "trainer_state.pt does not match its sha256"),
    ("newer format", ["--resume", C], newer_format, 2, "has format version 99; this distseq reads version 1"),
    ("meta not json", ["--resume", C], meta_not_json, 2, "meta.json is not valid JSON"),
    ("incomplete checkpoint", ["--resume", C], meta_missing, 2, "has no meta.json (incomplete)"),
    ("config unknown key", ["--config", T + "/c.yaml"], a_file("c.yaml", "model:\n  hiden_size: 8\n"), 2,
     "unknown key model.hiden_size (did you mean 'hidden_size'?)"),
    ("config unknown section", ["--config", T + "/c.yaml"], a_file("c.yaml", "optimizer:\n  lr: 0.1\n"), 2,
     "unknown section 'optimizer' (did you mean 'optim'?)"),
    ("config not yaml", ["--config", T + "/c.yaml"], a_file("c.yaml", "model: [unclosed\n"), 2, "is not valid YAML"),
    ("config not json", ["--config", T + "/c.json"], a_file("c.json", "{'single': quotes}"), 2, "is not valid JSON"),
    ("config missing", ["--config", T + "/none.yaml"], setup_nothing, 2, "--config: cannot read"),
    ("config wrong type", ["--config", T + "/c.json"], a_file("c.json", '{"optim": {"lr": "fast"}}'), 2,
     "--lr: must be a finite number > 0 (got 'fast')"),
    ("profile steps past the end", ["--profile-steps", "2:9"], setup_nothing, 2,
     "--profile-steps: expected 0 <= A < B <= --max-steps 6 (got '2:9')"),
    ("data file missing", ["--data-files", T + "/none.jsonl"], setup_nothing, 2, "--data-files: no such file"),
    ("data column missing", ["--data-files", T + "/d.jsonl", "--label-column", "y"],
     a_file("d.jsonl", '{"sequence": [0.1], "label": 1}\n'), 2, "--label-column: column 'y' is not in"),
]


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert_ok(run_distseq(["train", "--run-dir", str(run), "--hidden-size", "16", "--global-batch-size", "64", *TINY]))
    return run


def test_the_table_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case,extra,setup,code,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, extra, setup, code, message, finished_run, tmp_path, capsys):
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    shutil.copytree(finished_run, run)
    scratch.mkdir()
    setup(run, scratch)
    before_run, before_scratch = tree_hash(run), tree_hash(scratch)
    args = [a.replace("{run}", str(run)).replace("{tmp}", str(scratch)) for a in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--run-dir", str(run), "--hidden-size", "16", "--global-batch-size", "64", *TINY, *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == code
    assert len(err.splitlines()) == 1 and message in err, err
    assert tree_hash(run) == before_run and tree_hash(scratch) == before_scratch
