"""A table of wrong inputs: each is one line naming the problem, a non-zero exit, and no file touched.

Every case runs against a copy of a finished run directory with checkpoints, hashed before and after.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY, assert_ok, run_here

from distseq.cli import main

CKPT = "checkpoints/step-00000006"


def setup_nothing(run: Path, tmp: Path) -> None:
    pass


def truncate_weights(run: Path, tmp: Path) -> None:
    path = run / CKPT / "state" / "__0_0.distcp"  # the weights and optimizer state of rank 0
    path.write_bytes(path.read_bytes()[:64])


def wrong_sha(run: Path, tmp: Path) -> None:
    meta = json.loads((run / CKPT / "meta.json").read_text())
    meta["sha256"]["state/.metadata"] = "0" * 64
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
TRAIN = ["train", "--run-dir", R, "--hidden-size", "16", "--global-batch-size", "64", *TINY]
HELD = []  # run-dir locks a case holds while it runs


def hold_lock(run: Path, tmp: Path) -> None:
    from distseq.fsio import RunDirLock

    HELD.append(RunDirLock(run).acquire())


def train(*args):
    return [*TRAIN, *args]


# (case, command line, setup, exit code, text the one-line message must contain)
CASES = [
    ("negative lr", train("--lr", "-1"), setup_nothing, 2, "--lr: must be a finite number > 0"),
    ("unknown model", train("--model", "cnn"), setup_nothing, 2, "--model: invalid choice 'cnn'"),
    ("zero hidden", train("--hidden-size", "0"), setup_nothing, 2, "--hidden-size: must be an integer >= 1"),
    ("non-integer steps", train("--max-steps", "ten"), setup_nothing, 2, "argument --max-steps: invalid int value"),
    ("batch not divisible", train("--global-batch-size", "100", "--grad-accum-steps", "3"), setup_nothing, 2,
     "--global-batch-size: 100 is not divisible"),
    ("fp16 on cpu", train("--precision", "fp16"), setup_nothing, 2, "--precision: fp16 does not run on CPU"),
    ("bad on-nonfinite", train("--on-nonfinite", "ignore"), setup_nothing, 2, "--on-nonfinite: invalid choice"),
    ("negative keep-last", train("--keep-last", "-1"), setup_nothing, 2, "--keep-last: must be an integer >= 0"),
    ("zero timeout", train("--dist-timeout-s", "0"), setup_nothing, 2, "--dist-timeout-s: must be an integer >= 1"),
    ("straggler factor of 1", train("--straggler-factor", "1"), setup_nothing, 2,
     "--straggler-factor: must be a finite number > 1, or 0 to never report a slow rank (got 1.0)"),
    ("straggler factor nan", train("--straggler-factor", "nan"), setup_nothing, 2,
     "--straggler-factor: must be a finite"),
    ("min above max length", train("--min-seq-len", "20"), setup_nothing, 2,
     "--min-seq-len: 20 is longer than --seq-len"),
    ("start-step with a resume path", train("--start-step", "3", "--resume", C), setup_nothing, 2,
     "--start-step: applies to a fresh start; a checkpoint given to --resume sets the step"),
    ("resume path missing", train("--resume", "/no/such/checkpoint"), setup_nothing, 2,
     "--resume: expected auto, never"),
    ("run dir is a file", train("--run-dir", T + "/plain"), a_file("plain", "data"), 2, "--run-dir: "),
    ("run dir unwritable", train("--run-dir", "/proc/distseq-test/run"), setup_nothing, 2,
     "--run-dir: cannot write to"),
    ("run dir under a file", train("--run-dir", T + "/plain/run"), a_file("plain", "data"), 2,
     "--run-dir: cannot create"),
    ("run dir empty", train("--run-dir", ""), setup_nothing, 2, "--run-dir: must not be empty"),
    ("run dir locked", train(), hold_lock, 2, "is in use by another distseq run (host "),
    ("fresh over an earlier run", train("--resume", "never"), setup_nothing, 2,
     "holds an earlier run (checkpoints, config.json, config_history.json, summary.json, ...); use a new --run-dir, "
     "or add --overwrite"),
    ("overwrite with a path", train("--overwrite", "--resume", C), setup_nothing, 2,
     "--overwrite: starts fresh; it cannot be combined with --resume PATH"),
    ("different model shape", train("--hidden-size", "32"), setup_nothing, 2,
     "was written with --hidden-size 16; this run has 32"),
    ("different data", train("--seq-len", "12"), setup_nothing, 2, "was written with --seq-len 10; this run has 12"),
    ("different global batch", train("--global-batch-size", "128"), setup_nothing, 2,
     "was written with --global-batch-size 64; this run has 128"),
    ("truncated weights", train("--resume", C), truncate_weights, 2, "state/__0_0.distcp does not match its sha256"),
    ("wrong sha256", train("--resume", C), wrong_sha, 2, "state/.metadata does not match its sha256"),
    ("newer format", train("--resume", C), newer_format, 2, "has format version 99; this distseq reads versions 1, 2"),
    ("meta not json", train("--resume", C), meta_not_json, 2, "meta.json is not valid JSON"),
    ("incomplete checkpoint", train("--resume", C), meta_missing, 2, "has no meta.json (incomplete)"),
    ("huge max steps", train("--max-steps", str(10**19)), setup_nothing, 2,
     "--max-steps: must be an integer >= 1 and <= 4611686018427387904 (got 10000000000000000000)"),
    ("stream positions overflow", train("--max-steps", str(10**17)), setup_nothing, 2,
     "--max-steps: --max-steps x --global-batch-size = 6400000000000000000 samples; stream positions must stay "
     "below 2^62"),
    ("huge block", train("--block-size", str(10**9)), setup_nothing, 2,
     "--block-size: 1000000000 samples x 10 steps x 1 features of float32 take 37 GiB at once"),
    ("huge eval set", train("--eval-size", str(10**10)), setup_nothing, 2,
     "--eval-size: 10000000000 samples x 10 steps"),
    ("huge micro-batch", train("--global-batch-size", str(2**40)), setup_nothing, 2, "--global-batch-size: "),
    ("seed past 64 bits", train("--seed", str(2**64)), setup_nothing, 2, "--seed: must be an integer >= 0 and <= "),
    ("timeout past a year", train("--dist-timeout-s", str(10**12)), setup_nothing, 2,
     "--dist-timeout-s: must be an integer"),
    ("workers by the thousand", train("--num-workers", "100000"), setup_nothing, 2,
     "--num-workers: must be an integer >= 0 and <= 256"),
    ("hidden by the million", train("--hidden-size", str(10**6)), setup_nothing, 2,
     "--hidden-size: must be an integer >= 1 and <= 65536"),
    ("skip fraction above one", train("--max-skipped-fraction", "2"), setup_nothing, 2,
     "--max-skipped-fraction: must be a finite number >= 0 and <= 1 (got 2.0)"),
    ("config unknown key", train("--config", T + "/c.yaml"), a_file("c.yaml", "model:\n  hiden_size: 8\n"), 2,
     "unknown key model.hiden_size (did you mean 'hidden_size'?)"),
    ("config unknown section", train("--config", T + "/c.yaml"), a_file("c.yaml", "optimizer:\n  lr: 0.1\n"), 2,
     "unknown section 'optimizer' (did you mean 'optim'?)"),
    ("config not yaml", train("--config", T + "/c.yaml"), a_file("c.yaml", "model: [unclosed\n"), 2,
     "is not valid YAML"),
    ("config not json", train("--config", T + "/c.json"), a_file("c.json", "{'single': quotes}"), 2,
     "is not valid JSON"),
    ("config missing", train("--config", T + "/none.yaml"), setup_nothing, 2, "--config: cannot read"),
    ("config wrong type", train("--config", T + "/c.json"), a_file("c.json", '{"optim": {"lr": "fast"}}'), 2,
     "--lr: must be a number (got 'fast')"),
    ("config path as a number", ["train", "--config", T + "/c.yaml"], a_file("c.yaml", "train:\n  run_dir: 5\n"), 2,
     "--run-dir: must be a string (got 5)"),
    ("config boolean as a string", train("--config", T + "/c.yaml"), a_file("c.yaml", "train:\n  verify_data: 'yes'\n"),
     2, "--verify-data: must be true or false (got 'yes')"),
    ("config integer as a float", train("--config", T + "/c.json"),
     a_file("c.json", '{"checkpoint": {"keep_last": 2.5}}'),
     2, "--keep-last: must be an integer (got 2.5)"),
    ("config null integer", train("--config", T + "/c.json"), a_file("c.json", '{"model": {"num_layers": null}}'), 2,
     "--num-layers: must be an integer (got None)"),
    ("config list for a number", train("--config", T + "/c.json"), a_file("c.json", '{"optim": {"lr": [1]}}'), 2,
     "--lr: must be a number (got [1])"),
    ("config section not a mapping", train("--config", T + "/c.yaml"), a_file("c.yaml", "model: 5\n"), 2,
     "section 'model' must be a mapping"),
    ("config not utf-8", train("--config", T + "/c.yaml"), lambda run, tmp: (tmp / "c.yaml").write_bytes(b"\x80\xff"),
     2, "--config: cannot read {tmp}/c.yaml: not UTF-8 text"),
    ("config not a regular file", train("--config", "/dev/zero"), setup_nothing, 2,
     "--config: /dev/zero is not a regular file"),
    ("config yaml no for a choice", train("--config", T + "/c.yaml"), a_file("c.yaml", "train:\n  precision: no\n"), 2,
     "--precision: must be a string (got False) (YAML reads yes/no/on/off as booleans and 1:3 as a number: quote it)"),
    ("config yaml base-60 profile", train("--config", T + "/c.yaml"),
     a_file("c.yaml", "log:\n  profile_steps: 1:3\n"), 2,
     "--profile-steps: must be a string or absent (got 63)"),
    ("config key not a string", train("--config", T + "/c.yaml"), a_file("c.yaml", "train:\n  1: 3\n"), 2,
     "unknown key train.1"),
    ("profile steps superscripts", train("--profile-steps", "²:³"), setup_nothing, 2, "--profile-steps: expected A:B"),
    ("profile steps past the end", train("--profile-steps", "2:9"), setup_nothing, 2,
     "--profile-steps: expected 0 <= A < B <= --max-steps 6 (got '2:9')"),
    ("data file missing", train("--data-files", T + "/none.jsonl"), setup_nothing, 2, "--data-files: no such file"),
    ("data column missing", train("--data-files", T + "/d.jsonl", "--label-column", "y"),
     a_file("d.jsonl", '{"sequence": [0.1], "label": 1}\n'), 2, "--label-column: column 'y' is not in"),
    ("data file empty", train("--data-files", T + "/d.jsonl"), a_file("d.jsonl", ""), 2, "d.jsonl has no rows"),
    # token tasks and the decoder
    ("mqar sequence too short", train("--task", "mqar", "--seq-len", "12", "--num-kv-pairs", "4"), setup_nothing, 2,
     "--seq-len: mqar needs --seq-len >= 4 x --num-kv-pairs = 16 (the pairs, then a query slot per pair) (got 12)"),
    ("mqar vocabulary too small", train("--task", "mqar", "--seq-len", "64", "--num-kv-pairs", "4",
                                        "--vocab-size", "9"),
     setup_nothing, 2, "--vocab-size: mqar draws 4 distinct keys from [1, vocab/2): --vocab-size must be at least 10 "
     "for --num-kv-pairs 4 (got 9)"),
    ("mqar zero pairs", train("--task", "mqar", "--num-kv-pairs", "0"), setup_nothing, 2,
     "--num-kv-pairs: must be an integer >= 1 (got 0)"),
    ("induction too short", train("--task", "induction", "--seq-len", "2"), setup_nothing, 2,
     "--seq-len: induction needs --seq-len >= 3 (A, B, then A again) (got 2)"),
    ("selective-copy too short", train("--task", "selective-copy", "--seq-len", "9", "--copy-len", "5"), setup_nothing,
     2, "--seq-len: selective-copy needs --seq-len >= 2 x --copy-len = 10"),
    ("tie embeddings with lstm", train("--task", "mqar", "--seq-len", "16", "--num-kv-pairs", "2", "--model", "lstm",
                                       "--tie-embeddings"), setup_nothing, 2,
     "--tie-embeddings: is not an option of --model lstm (its own options: --bidirectional); it belongs to --model "
     "decoder"),
    ("rope with the transformer", train("--model", "transformer", "--positions", "rope"), setup_nothing, 2,
     "--positions: invalid choice 'rope' (choose from sinusoidal, learned) [an option of --model transformer]"),
    ("rope with an odd head width", train("--model", "decoder", "--positions", "rope", "--hidden-size", "18",
                                          "--num-heads", "2"), setup_nothing, 2,
     "--positions: rotary positions rotate pairs of dimensions: --hidden-size / --num-heads = 9 must be even"),
    ("tie embeddings without tokens", train("--task", "copy", "--seq-len", "12", "--model", "decoder",
                                            "--tie-embeddings"), setup_nothing, 2,
     "--tie-embeddings: needs a token task whose outputs are its vocabulary (copy is not one)"),
    ("min length with a token task", train("--task", "mqar", "--seq-len", "16", "--num-kv-pairs", "2",
                                           "--min-seq-len", "8"), setup_nothing, 2,
     "--min-seq-len: the mqar task has a fixed length; leave --min-seq-len out"),
    ("data files with a token task", train("--task", "induction", "--data-files", T + "/d.jsonl"),
     a_file("d.jsonl", '{"sequence": [0.1], "label": 1}\n'), 2,
     "d.jsonl: row 0 (from 0): 'sequence' must be a list of integer token ids"),
    # eval
    ("eval without checkpoints", ["eval", "--run-dir", T], setup_nothing, 2, "no intact checkpoint under"),
    ("eval output dir missing", ["eval", "--run-dir", R, "--output", T + "/no/e.json"], setup_nothing, 2,
     "--output: cannot write " + "{tmp}/no/e.json: directory {tmp}/no does not exist"),
    ("eval output is a directory", ["eval", "--run-dir", R, "--output", T], setup_nothing, 2,
     "--output: {tmp} is a directory; give a file name"),
    ("eval output unwritable", ["eval", "--run-dir", R, "--output", "/proc/e.json"], setup_nothing, 2,
     "--output: cannot write to /proc/e.json"),
    ("eval size zero", ["eval", "--run-dir", R, "--eval-size", "0"], setup_nothing, 2,
     "--eval-size: must be an integer >= 1"),
    ("eval checkpoint missing", ["eval", "--run-dir", R, "--checkpoint", T + "/none"], setup_nothing, 2,
     "{tmp}/none is not a checkpoint directory"),
    ("eval damaged checkpoint", ["eval", "--run-dir", R, "--checkpoint", C], truncate_weights, 2,
     "state/__0_0.distcp does not match its sha256"),
    ("eval data file missing", ["eval", "--run-dir", R, "--data-files", T + "/none.jsonl"], setup_nothing, 2,
     "--data-files: no such file"),
    ("eval data file empty", ["eval", "--run-dir", R, "--output", T + "/e.json", "--data-files", T + "/d.jsonl"],
     a_file("d.jsonl", ""), 2, "d.jsonl has no rows"),
    # predict
    ("predict checkpoint missing", ["predict", "--checkpoint", T + "/none", "--random", "2"], setup_nothing, 2,
     "is not a checkpoint directory"),
    ("predict zero samples", ["predict", "--checkpoint", C, "--random", "0"], setup_nothing, 2,
     "--random: must be an integer >= 1 (got 0)"),
    ("predict too many samples", ["predict", "--checkpoint", C, "--random", str(10**12)], setup_nothing, 2,
     "--random: must be an integer >= 1 and <= 10000000"),
    ("predict input missing", ["predict", "--checkpoint", C, "--input", T + "/none.jsonl"], setup_nothing, 2,
     "none.jsonl: cannot read"),
    ("predict input not json", ["predict", "--checkpoint", C, "--input", T + "/in.jsonl"],
     a_file("in.jsonl", "{x\n"), 2,
     "in.jsonl: line 1: not valid JSON"),
    ("predict output is a directory", ["predict", "--checkpoint", C, "--random", "2", "--output", T], setup_nothing, 2,
     "--output: {tmp} is a directory"),
    ("predict output dir missing", ["predict", "--checkpoint", C, "--random", "2", "--output", T + "/no/p.jsonl"],
     setup_nothing, 2, "--output: cannot write {tmp}/no/p.jsonl: directory {tmp}/no does not exist"),
    # export
    ("export over its checkpoint", ["export", "--checkpoint", C, "--out", C], setup_nothing, 2,
     "--out: must differ from --checkpoint"),
    ("export out empty", ["export", "--checkpoint", C, "--out", ""], setup_nothing, 2, "--out: must not be empty"),
    ("export out is a file", ["export", "--checkpoint", C, "--out", T + "/plain"], a_file("plain", "x"), 2,
     "--out: {tmp}/plain exists and is not a directory"),
    ("export out unwritable", ["export", "--checkpoint", C, "--out", "/proc/distseq-export"], setup_nothing, 2,
     "--out: cannot write to /proc/distseq-export"),
    ("export damaged checkpoint", ["export", "--checkpoint", C, "--out", T + "/out"], wrong_sha, 2,
     "state/.metadata does not match its sha256"),
    ("predict output empty", ["predict", "--checkpoint", C, "--random", "2", "--output", ""], setup_nothing, 2,
     "--output: must not be empty"),
    # probe
    ("probe json is a directory", ["probe", "--json", T], setup_nothing, 2, "--json: {tmp} is a directory"),
    ("probe zero width", ["probe", "--hidden-size", "0"], setup_nothing, 2, "--hidden-size: must be an integer >= 1"),
    ("probe huge length", ["probe", "--seq-len", str(10**9)], setup_nothing, 2,
     "--seq-len: must be an integer >= 1 and <= 1048576"),
    ("probe unknown preset", ["probe", "--preset", "huge"], setup_nothing, 2, "--preset: invalid choice 'huge'"),
    # bench
    ("bench unknown suite", ["bench", "nope", "--out", T + "/b"], setup_nothing, 2, "SUITE: unknown suite 'nope'"),
    ("bench out is a file", ["bench", "stream", "--out", T + "/plain"], a_file("plain", "x"), 2,
     "--out: {tmp}/plain exists and is not a directory"),
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
    assert_ok(run_here(["train", "--run-dir", str(run), "--hidden-size", "16", "--global-batch-size", "64", *TINY]))
    return run


@pytest.mark.parametrize("case,argv,setup,code,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, setup, code, message, finished_run, tmp_path, capsys):
    """Each case is one line naming the problem, its exit code, and not one byte changed in the run
    directory or the scratch directory beside it."""
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    shutil.copytree(finished_run, run)
    scratch.mkdir()
    try:
        setup(run, scratch)
        before_run, before_scratch = tree_hash(run), tree_hash(scratch)
        fill = lambda text: text.replace("{run}", str(run)).replace("{tmp}", str(scratch))  # noqa: E731
        with pytest.raises(SystemExit) as exit_info:
            main([fill(a) for a in argv])
        after_run, after_scratch = tree_hash(run), tree_hash(scratch)
    finally:
        while HELD:
            HELD.pop().release()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == code, err
    assert len(err.splitlines()) == 1 and fill(message) in err, err
    assert after_run == before_run and after_scratch == before_scratch
