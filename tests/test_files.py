"""Training on your own files: streamed with datasets, split across ranks, lockstep end, clear row errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, accelerate_launch, assert_ok, run_distseq, summary, two_process_args
from distseq.cli import main
from distseq.files import FileStream
from distseq.tasks import TASKS, TaskSpec


def write_jsonl(path, rows, seq_len=6, seed=0, **fields):
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            x = torch.randn(seq_len, generator=generator)
            handle.write(json.dumps({"seq": x.tolist(), "target": int(x.sum() > 0), **fields}) + "\n")
    return path


def file_args(files, run_dir, *extra):
    return ["train", "--data-files", ",".join(map(str, files)), "--sequence-column", "seq", "--label-column", "target",
            "--seq-len", "6", "--global-batch-size", "16", "--max-steps", "100", "--eval-size", "64",
            "--eval-every", "0", "--log-every", "2", "--no-progress", "--run-dir", str(run_dir), *extra]


def test_jsonl_and_parquet_train_until_the_rows_run_out(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", 70)
    proc = run_distseq(file_args([jsonl], tmp_path / "run"))
    assert_ok(proc)
    assert summary(tmp_path / "run")["step"] == 4  # 70 rows // 16 per step; the 6 left over are dropped
    assert "data files used up after step 4" in proc.stdout

    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    table = pa.table({"seq": [r["seq"] for r in rows], "target": [r["target"] for r in rows]})
    pq.write_table(table, tmp_path / "a.parquet")
    assert_ok(run_distseq(file_args([tmp_path / "a.parquet"], tmp_path / "pq")))
    assert summary(tmp_path / "pq")["step"] == 4


@pytest.mark.multiproc
def test_uneven_rows_across_two_ranks_end_in_lockstep(tmp_path):
    big, small = write_jsonl(tmp_path / "big.jsonl", 100, seed=1), write_jsonl(tmp_path / "small.jsonl", 40, seed=2)
    proc = accelerate_launch(two_process_args(), file_args([big, small], tmp_path / "run"), timeout=180)
    assert_ok(proc)
    result = summary(tmp_path / "run")
    # 2 files over 2 ranks: one file each; the 40-row rank holds 5 micro-batches of 8, so all stop after 5 steps
    assert result["world_size"] == 2 and result["step"] == 5


def test_stream_resumes_from_its_state_dict(tmp_path):
    files = [str(write_jsonl(tmp_path / f"{i}.jsonl", 30, seed=i)) for i in range(2)]
    task, spec = TASKS["sum-sign"], TaskSpec(6, 6)

    def stream():
        return FileStream(files, "seq", "target", task, spec, rank=0, world_size=1, micro_batch=8)

    first = stream()
    for _ in range(4):  # crosses into the second file
        first.next_micro_batch()
    state = first.state_dict()
    expected = [first.next_micro_batch() for _ in range(2)]
    resumed = stream()
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_micro_batch()
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["y"], want["y"])
    # 60 rows = 7 full micro-batches of 8; the 4 left over are dropped
    assert resumed.next_micro_batch() is not None and resumed.next_micro_batch() is None


def test_labels_and_padding_from_rows(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text("\n".join(json.dumps({"sequence": [1.0] * n, "label": 1}) for n in (3, 6, 4, 5)) + "\n")
    stream = FileStream([str(path)], "sequence", "label", TASKS["sum-sign"], TaskSpec(6, 3), 0, 1, micro_batch=4)
    batch = stream.next_micro_batch()
    assert batch["x"].shape == (4, 6, 1) and batch["lengths"].tolist() == [3, 6, 4, 5]
    assert batch["x"][0, 3:].abs().sum() == 0 and batch["y"].tolist() == [1.0] * 4


BAD_ROWS = [
    ('{"seq": [0.1, "x", 0.3, 0.1, 0.1, 0.1], "target": 1}', "row 2 (from 0): 'seq' is not a list of numbers"),
    ('{"seq": [0.1, 0.2], "target": 1}', "row 2 (from 0): sequence length 2, expected 6"),
    ('{"seq": [0.1, 0.2, 0.3, 0.1, 0.1, 0.1], "target": 3}', "row 2 (from 0): 'target' must be 0 or 1"),
    ('{"seq": [0.1, 0.2, 0.3, 0.1, 0.1, 0.1]}', "row 2 (from 0): missing 'target'"),
    ('{"seq": [0.1, oops], "target": 0}', "cannot parse: JSON parse error: Invalid value. in row 2"),
]


def run_in_process(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("line,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_malformed_row_names_file_and_row(line, message, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", 2)
    with open(path, "a") as handle:
        handle.write(line + "\n")
    code, err = run_in_process(file_args([path], tmp_path / "run", "--global-batch-size", "4"), capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err


@pytest.mark.multiproc
def test_a_bad_row_on_one_rank_stops_both_without_a_hang(tmp_path):
    good, bad = write_jsonl(tmp_path / "a.jsonl", 60, seed=1), write_jsonl(tmp_path / "b.jsonl", 20, seed=2)
    with open(bad, "a") as handle:
        handle.write('{"seq": "not a list", "target": 1}\n')
    proc = accelerate_launch(two_process_args(), file_args([good, bad], tmp_path / "run"), timeout=180)
    assert proc.returncode != 0
    assert f"{bad}: row 20 (from 0): 'seq' is not a list of numbers" in proc.stderr
    # the launcher prints its own ChildFailedError traceback; no frame of distseq may appear
    assert str(REPO / "distseq") not in proc.stderr


@pytest.mark.parametrize("extra,option", [
    (["--data-files", "/nonexistent/x.jsonl"], "--data-files"),
    (["--sequence-column", "nope"], "--sequence-column"),
    (["--label-column", "nope"], "--label-column"),
    (["--task", "copy", "--copy-len", "2"], "--task"),
    (["--num-workers", "2"], "--num-workers"),
    (["--verify-data"], "--verify-data"),
])
def test_bad_data_file_options(extra, option, tmp_path, capsys):
    path = write_jsonl(tmp_path / "ok.jsonl", 20)
    code, err = run_in_process(file_args([path], tmp_path / "run", *extra), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and option in err, err
    assert not (tmp_path / "run").exists()
