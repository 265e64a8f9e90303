"""Training on your own files: the indexed dataset (every row once per epoch, elastic exact resume,
bit-exact recovery, clear row errors) and --data-streaming (one pass, lockstep end)."""

import json
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    DISTSEQ,
    REPO,
    accelerate_launch,
    assert_bit_identical,
    assert_ok,
    free_port,
    run_here,
    run_until,
    summary,
    two_process_args,
    weights_at,
)

from distseq.cli import main
from distseq.data.streaming import FileStream
from distseq.data.verify import Digest
from distseq.tasks.base import TASKS, TaskSpec


def write_jsonl(path, rows, seq_len=6, seed=0, **fields):
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            x = torch.randn(seq_len, generator=generator)
            handle.write(json.dumps({"seq": x.tolist(), "target": int(x.sum() > 0), **fields}) + "\n")
    return path


def jsonl_to_parquet(jsonl, path):
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    pq.write_table(pa.table({"seq": [r["seq"] for r in rows], "target": [r["target"] for r in rows]}), path)
    return path


def file_args(files, run_dir, *extra):
    return ["train", "--data-files", ",".join(map(str, files)), "--sequence-column", "seq", "--label-column", "target",
            "--seq-len", "6", "--global-batch-size", "16", "--max-steps", "100", "--eval-size", "64",
            "--eval-every", "0", "--log-every", "2", "--no-progress", "--run-dir", str(run_dir), *extra]


def run_in_process(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err.strip()


# --- the indexed dataset ------------------------------------------------------------------------
def test_files_cycle_over_epochs_the_same_from_jsonl_and_parquet(tmp_path):
    """70 rows, 16 per step: 10 steps are 2.3 epochs, nothing dropped, every position once (--verify-data);
    the same values from JSON lines or parquet train the same weights bit for bit."""
    jsonl = write_jsonl(tmp_path / "a.jsonl", 70)
    parquet = jsonl_to_parquet(jsonl, tmp_path / "a.parquet")
    runs = {}
    for name, path in (("jsonl", jsonl), ("parquet", parquet)):
        runs[name] = tmp_path / name
        proc = run_here(file_args([path], runs[name], "--max-steps", "10", "--verify-data"))
        assert_ok(proc)
        assert ("distseq: data: 70 rows in 1 file(s); one epoch = 4.375 steps of 16, reshuffled each epoch"
                in proc.stdout)
        result = summary(runs[name])
        assert result["step"] == 10 and result["samples"] == 160 and result["status"] == "complete"
        assert result["data_accounting"]["checked_until"] == 160
        meta = json.loads((runs[name] / "checkpoints" / "step-00000010" / "meta.json").read_text())
        assert meta["data"]["rows"] == 70 and meta["data"]["files"] == 1
    assert proc.stdout.count("indexing") == 1  # a new file's index is built once, with one line
    assert_bit_identical(weights_at(runs["jsonl"], 10), weights_at(runs["parquet"], 10))


def test_the_index_is_built_once_and_reused(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", 40)
    first = run_here(file_args([data], tmp_path / "one", "--max-steps", "2"))
    second = run_here(file_args([data], tmp_path / "two", "--max-steps", "2"))
    assert_ok(first), assert_ok(second)
    assert "distseq: indexing 1 of 1 data file(s)" in first.stdout and "indexed 40 rows" in first.stdout
    assert "indexing" not in second.stdout and "indexed" not in second.stdout
    data.write_text(data.read_text() + data.read_text().splitlines(keepends=True)[0])  # one more row
    third = run_here(file_args([data], tmp_path / "three", "--max-steps", "2"))
    assert_ok(third)
    assert f"distseq: {data} changed size" in third.stdout and "indexed 41 rows" in third.stdout


def test_a_file_changed_since_the_checkpoint_refuses_the_resume(tmp_path):
    data, run_dir = write_jsonl(tmp_path / "a.jsonl", 40), tmp_path / "run"
    assert_ok(run_here(file_args([data], run_dir, "--max-steps", "4")))
    write_jsonl(data, 40, seed=7)  # same rows count, other values
    proc = run_here(file_args([data], run_dir, "--max-steps", "8"))
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert f"{run_dir / 'checkpoints' / 'step-00000004'} was trained on other data: 40 rows in 1 file(s)" in line


def test_a_file_changed_under_a_running_job_stops_it_without_saving(tmp_path):
    data, run_dir = write_jsonl(tmp_path / "a.jsonl", 40), tmp_path / "run"
    args = file_args([data], run_dir, "--max-steps", "600", "--checkpoint-every", "300", "--log-every", "1",
                     "--hidden-size", "8")

    def append_a_row(process) -> None:
        with open(data, "a") as handle:
            handle.write(data.read_text().splitlines(keepends=True)[0])

    proc = run_until([*DISTSEQ, *args], "step=2/", append_a_row, tmp_path / "logs")
    err = proc.stderr
    assert proc.returncode == 2, err
    line, = err.strip().splitlines()
    assert f"{data} changed size" in line and "while this run trained on it; stopped at step 300 without saving" in line
    assert not (run_dir / "checkpoints").is_dir() or not list((run_dir / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_killed_file_run_resumes_bit_exact(tmp_path):
    """kill -9 mid-run (a DataLoader worker reading the index): the rerun matches an uninterrupted run."""
    data = write_jsonl(tmp_path / "a.jsonl", 50)
    args = ["--max-steps", "24", "--checkpoint-every", "4", "--log-every", "1", "--num-workers", "1",
            "--precision", "no"]
    reference = tmp_path / "reference"
    assert_ok(run_here(file_args([data], reference, *args)))
    run_dir = tmp_path / "run"
    proc = run_until([*DISTSEQ, *file_args([data], run_dir, *args)], "step=10/",
                     lambda p: p.send_signal(signal.SIGKILL), tmp_path / "logs")
    assert proc.returncode == -signal.SIGKILL
    rerun = run_here(file_args([data], run_dir, *args))
    assert_ok(rerun)
    assert "resuming from" in rerun.stdout and "step 8" in rerun.stdout
    assert_bit_identical(weights_at(run_dir, 24), weights_at(reference, 24))


@pytest.mark.slow
@pytest.mark.multiproc
def test_elastic_resume_on_files_continues_at_the_next_sample(tmp_path):
    """One run resumed 2 -> 1 -> 3 -> 2 processes: each part consumes exactly the next positions
    (--verify-data) and the end equals an uninterrupted single-process run to float rounding."""
    files = [write_jsonl(tmp_path / "a.jsonl", 50, seed=1), write_jsonl(tmp_path / "b.jsonl", 27, seed=2)]
    common = ["--global-batch-size", "12", "--verify-data", "--precision", "no", "--checkpoint-every", "0",
              "--hidden-size", "16", "--log-every", "1"]
    reference = tmp_path / "reference"
    assert_ok(run_here(file_args(files, reference, *common, "--max-steps", "16")))
    run_dir = tmp_path / "run"
    for part, (world, until) in enumerate([(2, 4), (1, 8), (3, 12), (2, 16)]):
        args = file_args(files, run_dir, *common, "--max-steps", str(until))
        if world == 1:
            proc = run_here(args)
        else:
            launch = ["--multi_gpu", "--num_processes", str(world), "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "--main_process_port", str(free_port())]
            proc = accelerate_launch(launch, args, timeout=180)
        assert_ok(proc)
        result = summary(run_dir)
        assert result["world_size"] == world and result["step"] == until
        start = until - 4
        assert (f"resuming from {run_dir / 'checkpoints' / f'step-{start:08d}'}" in proc.stdout) == (part > 0)
        per_rank = [Digest(**d) for d in result["data_accounting"]["per_rank"]]
        merged = per_rank[0]
        for digest in per_rank[1:]:
            merged = merged.merge(digest)
        assert merged == Digest.of_range(start * 12, until * 12), part
    end, expected = weights_at(run_dir, 16), weights_at(reference, 16)
    for key in expected:
        torch.testing.assert_close(end[key], expected[key], rtol=1e-4, atol=1e-5)


# --- bad rows and options -------------------------------------------------------------------------
BAD_ROWS = [
    ('{"seq": [0.1, "x", 0.3, 0.1, 0.1, 0.1], "target": 1}', "row 2 (from 0): 'seq' is not a list of numbers"),
    ('{"seq": [0.1, 0.2], "target": 1}', "row 2 (from 0): sequence length 2, expected 6"),
    ('{"seq": [0.1, 0.2, 0.3, 0.1, 0.1, 0.1], "target": 3}', "row 2 (from 0): 'target' must be 0 or 1"),
    ('{"seq": [0.1, 0.2, 0.3, 0.1, 0.1, 0.1]}', "row 2 (from 0): missing 'target'"),
    ('{"seq": [0.1, 0.2, NaN, 0.1, 0.1, 0.1], "target": 1}', "row 2 (from 0): 'seq' holds a non-finite number"),
    ('{"seq": [0.1, oops], "target": 0}', "row 2 (from 0): not valid JSON"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
@pytest.mark.parametrize("streaming", [False, True], ids=["indexed", "streaming"])
def test_malformed_row_names_file_and_row(line, message, streaming, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", 2)
    with open(path, "a") as handle:
        handle.write(line + "\n")
    extra = ["--global-batch-size", "4"] + (["--data-streaming"] if streaming else [])
    code, err = run_in_process(file_args([path], tmp_path / "run", *extra), capsys)
    assert code == 2
    if streaming and "not valid JSON" in message:  # the streaming reader reports pyarrow's parse error
        message = "cannot parse: JSON parse error: Invalid value. in row 2"
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err
    assert streaming or not (tmp_path / "run").exists()  # indexed: found before anything is written


@pytest.mark.parametrize("extra,option", [
    (["--data-files", "/nonexistent/x.jsonl"], "--data-files"),
    (["--sequence-column", "nope"], "--sequence-column"),
    (["--label-column", "nope"], "--label-column"),
    (["--task", "copy", "--copy-len", "2"], "row 0 (from 0): each step of 'seq' must hold"),  # copy's rows: F numbers
    (["--dataset-size", "10"], "--dataset-size"),
    (["--data-streaming", "--num-workers", "2"], "--num-workers"),
    (["--data-streaming", "--verify-data"], "--verify-data"),
])
def test_bad_data_file_options(extra, option, tmp_path, capsys):
    path = write_jsonl(tmp_path / "ok.jsonl", 20)
    code, err = run_in_process(file_args([path], tmp_path / "run", *extra), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and option in err, err
    assert not (tmp_path / "run").exists()


def test_data_streaming_needs_data_files(tmp_path, capsys):
    code, err = run_in_process(["train", "--data-streaming", "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and err.endswith("--data-streaming: applies to --data-files only; "
                                      "give --data-files or leave it out")


# --- --data-streaming ------------------------------------------------------------------------------
def test_streamed_jsonl_and_parquet_train_until_the_rows_run_out(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", 70)
    proc = run_here(file_args([jsonl], tmp_path / "run", "--data-streaming"))
    assert_ok(proc)
    assert summary(tmp_path / "run")["step"] == 4  # 70 rows // 16 per step; the 6 left over are dropped
    assert "data files used up after step 4" in proc.stdout
    parquet = jsonl_to_parquet(jsonl, tmp_path / "a.parquet")
    assert_ok(run_here(file_args([parquet], tmp_path / "pq", "--data-streaming")))
    assert summary(tmp_path / "pq")["step"] == 4


@pytest.mark.multiproc
def test_uneven_streamed_rows_across_two_ranks_end_in_lockstep(tmp_path):
    big, small = write_jsonl(tmp_path / "big.jsonl", 100, seed=1), write_jsonl(tmp_path / "small.jsonl", 40, seed=2)
    proc = accelerate_launch(two_process_args(), file_args([big, small], tmp_path / "run", "--data-streaming"),
                             timeout=180)
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


def test_labels_and_padding_from_streamed_rows(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text("\n".join(json.dumps({"sequence": [1.0] * n, "label": 1}) for n in (3, 6, 4, 5)) + "\n")
    stream = FileStream([str(path)], "sequence", "label", TASKS["sum-sign"], TaskSpec(6, 3), 0, 1, micro_batch=4)
    batch = stream.next_micro_batch()
    assert batch["x"].shape == (4, 6, 1) and batch["lengths"].tolist() == [3, 6, 4, 5]
    assert batch["x"][0, 3:].abs().sum() == 0 and batch["y"].tolist() == [1.0] * 4


@pytest.mark.multiproc
def test_a_bad_streamed_row_on_one_rank_stops_both_without_a_hang(tmp_path):
    good, bad = write_jsonl(tmp_path / "a.jsonl", 60, seed=1), write_jsonl(tmp_path / "b.jsonl", 20, seed=2)
    with open(bad, "a") as handle:
        handle.write('{"seq": "not a list", "target": 1}\n')
    proc = accelerate_launch(two_process_args(), file_args([good, bad], tmp_path / "run", "--data-streaming"),
                             timeout=180)
    assert proc.returncode != 0
    assert f"{bad}: row 20 (from 0): 'seq' is not a list of numbers" in proc.stderr
    # the launcher prints its own ChildFailedError traceback; no frame of distseq may appear
    assert str(REPO / "distseq") not in proc.stderr


@pytest.mark.multiproc
def test_a_streamed_run_resumes_only_on_the_same_process_count(tmp_path):
    data, run_dir = write_jsonl(tmp_path / "a.jsonl", 200), tmp_path / "run"
    assert_ok(run_here(file_args([data], run_dir, "--data-streaming", "--max-steps", "2")))
    proc = accelerate_launch(two_process_args(), file_args([data], run_dir, "--data-streaming", "--max-steps", "4"),
                             timeout=180)
    assert proc.returncode != 0
    assert "--data-streaming runs resume only on the same number of processes (1, not 2)" in proc.stderr


def test_a_checkpoint_from_before_the_index_resumes_streamed(tmp_path):
    """A --data-files checkpoint written before --data-streaming existed (its config lacks the option):
    its files were streamed, so it resumes with --data-streaming and is refused, naming it, without."""
    data, run_dir = write_jsonl(tmp_path / "a.jsonl", 200), tmp_path / "run"
    assert_ok(run_here(file_args([data], run_dir, "--data-streaming", "--max-steps", "2")))
    meta_path = run_dir / "checkpoints" / "step-00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["data"]["data_streaming"], meta["config"]["data"]["data_cache"]
    meta_path.write_text(json.dumps(meta))
    refused = run_here(file_args([data], run_dir, "--max-steps", "4"))
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith(f"{meta_path.parent} was written with --data-streaming True; this run "
                                           f"has False (resume with the same value, or --resume never in a new "
                                           f"--run-dir)")
    resumed = run_here(file_args([data], run_dir, "--data-streaming", "--max-steps", "4"))
    assert_ok(resumed)
    assert "resuming from" in resumed.stdout and summary(run_dir)["step"] == 4


def test_index_only_builds_the_index_and_writes_nothing_of_the_run(tmp_path, capsys):
    data, run_dir = write_jsonl(tmp_path / "a.jsonl", 30), tmp_path / "run"
    main(file_args([data], run_dir, "--index-only"))
    out = capsys.readouterr().out
    assert "distseq: indexing 1 of 1 data file(s)" in out and "distseq: index of 1 file(s) ready: 30 rows" in out
    assert not run_dir.exists()
    proc = run_here(file_args([data], run_dir, "--max-steps", "2"))
    assert_ok(proc)
    assert "indexing" not in proc.stdout  # built already
    code, err = run_in_process(["train", "--index-only", "--run-dir", str(run_dir)], capsys)
    assert code == 2 and err.endswith("--index-only: needs --data-files (indexed, not --data-streaming)")


def test_a_files_run_resumed_without_its_files_is_refused(tmp_path):
    data, run_dir = write_jsonl(tmp_path / "a.jsonl", 40), tmp_path / "run"
    assert_ok(run_here(file_args([data], run_dir, "--max-steps", "2")))
    args = [a for a in file_args([data], run_dir, "--max-steps", "4") if a != str(data)]
    args.remove("--data-files")
    proc = run_here(args)
    assert proc.returncode == 2
    assert f"was written with --data-files {data}; this run has None" in proc.stderr


@pytest.mark.parametrize("extra,message", [
    (["--data-cache", " "], "--data-cache: is empty: give a directory, or leave it out for the default"),
    (["--data-files", "{dir}"], "--data-files: {dir} is a directory: give its files (e.g. {dir}/*.parquet)"),
])
def test_empty_cache_and_directory_are_one_line(extra, message, tmp_path, capsys):
    data = write_jsonl(tmp_path / "ok.jsonl", 20)
    extra = [e.format(dir=tmp_path) for e in extra]
    code, err = run_in_process(file_args([data], tmp_path / "run", *extra), capsys)
    assert code == 2 and err.endswith(message.format(dir=tmp_path)), err


def test_a_huge_bad_value_is_quoted_short(tmp_path, capsys):
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"seq": [0.1] * 6, "target": "x" * 100_000}) + "\n")
    code, err = run_in_process(file_args([path], tmp_path / "run"), capsys)
    assert code == 2 and len(err) < 300 and "'target' is not a number ('xxxx" in err and "(100002 characters)" in err
