"""--task lm on your own tokens: packing against a plain-Python reference, every file kind, the held-out
share, bad data in one line, a byte-level model that learns, elastic and killed runs resumed exactly."""

import json
import math
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    DISTSEQ,
    accelerate_launch,
    assert_bit_identical,
    assert_ok,
    free_port,
    run_here,
    run_until,
    summary,
    weights_at,
)

from distseq.data.index import FileSource
from distseq.data.text import ByteCodec
from distseq.data.tokens import TokenLayout, open_token_index
from distseq.data.verify import Digest
from distseq.tasks import IGNORE


# --- a plain-Python reference of the windows ------------------------------------------------------
def reference_windows(documents, eod, seq_len, packing):
    """Every window as (x, y) lists, computed the slow and obvious way."""
    pad = eod if eod is not None else 0
    with_eod = [list(doc) + ([eod] if eod is not None else []) for doc in documents]
    pieces = [sum(with_eod, [])] if packing == "packed" else with_eod
    windows = []
    for tokens in pieces:
        for start in range(0, max(len(tokens) - 1, 0), seq_len):
            window = tokens[start:start + seq_len + 1]
            x = window[:seq_len] + [pad] * (seq_len - len(window[:seq_len]))
            y = window[1:] + [IGNORE] * (seq_len - len(window[1:]))
            windows.append((x, y))
    return windows


def random_documents(n, vocab, seed, low=1, high=30):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(low, high + 1)).tolist() for _ in range(n)]


def write_jsonl(path, documents, column="tokens"):
    path.write_text("".join(json.dumps({column: doc, "other": "kept out"}) + "\n" for doc in documents))
    return path


def write_parquet(path, documents, column="tokens", value=pa.int32()):
    pq.write_table(pa.table({column: pa.array(documents, type=pa.list_(value))}), path)
    return path


def write_bin(path, documents, dtype=np.uint16, offsets=True):
    np.concatenate([np.asarray(d, dtype=dtype) for d in documents]).tofile(path)
    if offsets:
        starts = np.concatenate([[0], np.cumsum([len(d) for d in documents])[:-1]]).astype(np.int64)
        np.save(path.with_suffix(".offsets.npy"), starts)
    return path


def token_index(files, tmp_path, *, vocab, seq_len, eod=None, packing="packed", token_dtype="uint16", codec=None,
                column="tokens"):
    layout = TokenLayout("tokens", column, vocab, eod, token_dtype, "bytes" if codec else "none")
    return open_token_index([str(f) for f in files], layout, codec, seq_len, packing, str(tmp_path / "cache"),
                            say=lambda line: None, progress=False)


def all_windows(index):
    batch = index.take(torch.arange(index.rows))
    return [(x.tolist(), y.tolist()) for x, y in zip(batch["x"], batch["y"])]


@pytest.mark.parametrize("packing", ["packed", "document"])
@pytest.mark.parametrize("eod", [None, 99], ids=["no-eod", "eod"])
@pytest.mark.parametrize("seq_len", [1, 4, 7, 64])
def test_windows_equal_the_reference_across_documents_and_files(packing, eod, seq_len, tmp_path):
    """Documents in a JSON-lines file, a parquet file and a .bin with offsets, in that order: one token array.
    Windows cross document and file boundaries (packed) or stop at each document's end (document), and the last
    partial window is kept: every token is the target of exactly one window."""
    documents = random_documents(23, 99, seed=seq_len) + [[5]]  # a one-token document too
    files = [write_jsonl(tmp_path / "a.jsonl", documents[:8]), write_parquet(tmp_path / "b.parquet", documents[8:15]),
             write_bin(tmp_path / "c.bin", documents[15:])]
    index = token_index(files, tmp_path, vocab=100, seq_len=seq_len, eod=eod, packing=packing)
    expected = reference_windows(documents, eod, seq_len, packing)
    assert index.rows == len(expected)
    assert all_windows(index) == expected
    assert index.documents == len(documents) and index.tokens == sum(map(len, documents)) + (eod is not None) * 24
    shuffled = torch.randperm(index.rows, generator=torch.Generator().manual_seed(0))
    again = index.take(shuffled)  # any order, one batch
    assert [(x.tolist(), y.tolist()) for x, y in zip(again["x"], again["y"])] == [expected[i] for i in shuffled]


def test_a_bin_file_without_offsets_is_one_document_of_its_dtype(tmp_path):
    tokens = np.arange(0, 70000, 7, dtype=np.uint32)  # ids past uint16
    tokens.tofile(tmp_path / "big.bin")
    index = token_index([tmp_path / "big.bin"], tmp_path, vocab=70000, seq_len=16, token_dtype="uint32")
    assert index.documents == 1 and index.tokens == len(tokens)
    assert all_windows(index) == reference_windows([tokens.tolist()], None, 16, "packed")


def test_epochs_are_permutations_of_the_training_windows_and_the_held_out_share_is_never_among_them(tmp_path):
    documents = random_documents(40, 50, seed=3)
    index = token_index([write_jsonl(tmp_path / "a.jsonl", documents)], tmp_path, vocab=51, seq_len=8, eod=50)
    held = 5
    train = FileSource(index, seed=7, variable=False, first=0, count=index.rows - held)
    n = train.count
    positions = torch.arange(0, 3 * n)
    ids = train.row_ids(positions)
    for epoch in range(3):
        assert sorted(ids[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert ids[:n].tolist() != ids[n:2 * n].tolist()  # reshuffled each epoch
    batch = train.samples(torch.arange(n - 3, n + 3))  # a batch that straddles the epoch boundary
    windows = all_windows(index)
    assert [(x.tolist(), y.tolist()) for x, y in zip(batch["x"], batch["y"])] == \
        [windows[i] for i in ids[n - 3:n + 3].tolist()]
    evaluation = FileSource(index, None, False, index.rows - held, held)
    assert evaluation.row_ids(torch.arange(held)).tolist() == list(range(index.rows - held, index.rows))


# --- text ---------------------------------------------------------------------------------------
def english(n_lines, seed=0):
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over a lazy dog while one cat sat on its mat".split()
    return "".join(" ".join(rng.choice(words, rng.integers(4, 10))) + ".\n" for _ in range(n_lines))


def test_text_files_are_their_bytes_with_byte_zero_ending_each_document(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\n")
    (tmp_path / "b.txt").write_text("ok")
    index = token_index([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path, vocab=256, seq_len=4, eod=0,
                        codec=ByteCodec())
    documents = [list("héllo\n".encode()), list(b"ok")]
    assert all_windows(index) == reference_windows(documents, 0, 4, "packed")
    assert ByteCodec().decode(list("héllo".encode())) == "héllo"


LM = ["train", "--task", "lm", "--model", "decoder", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2",
      "--no-progress", "--precision", "no", "--log-every", "10", "--checkpoint-every", "0"]


def lm_args(files, run_dir, *extra):
    return [*LM, "--data-files", ",".join(map(str, files)), "--run-dir", str(run_dir), *extra]


def unigram_entropy(data: bytes) -> float:
    counts = Counter(data)
    return -sum(c / len(data) * math.log(c / len(data)) for c in counts.values())


def test_a_byte_level_model_learns_a_text_file_below_its_unigram_entropy(tmp_path):
    text = english(800)
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    run_dir = tmp_path / "run"
    proc = run_here(lm_args([path], run_dir, "--seq-len", "64", "--global-batch-size", "16", "--max-steps", "200",
                            "--lr", "0.01", "--eval-every", "0", "--eval-size", "1000000"))
    assert_ok(proc)
    result = summary(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["vocab_size"] == 256 and config["data"]["eod_id"] == 0
    windows = math.ceil((len(text.encode()) + 1 - 1) / 64)
    held = math.ceil(0.05 * windows)
    assert f"{len(text.encode()) + 1} tokens in 1 document(s)" in proc.stdout and f"; {held} held out" in proc.stdout
    entropy = unigram_entropy(text.encode())  # nats per byte, ~2.9 here
    assert result["eval/samples"] == held
    assert result["eval/loss"] < 0.7 * entropy, (result["eval/loss"], entropy)  # measured: 0.5 x
    assert result["eval/perplexity"] == pytest.approx(math.exp(result["eval/loss"]), rel=1e-6)


# --- bad data: one line naming the file and the row or offset, exit 2, nothing created ----------------
def bad_cases(tmp: Path):
    good = random_documents(5, 10, seed=1)
    cases = {}
    cases["jsonl-id-outside-vocab"] = (write_jsonl(tmp / "v.jsonl", good[:3] + [[1, 2, 10]] + good[3:]), (),
                                       "v.jsonl: row 3 (from 0): token id 10 is outside [0, 10) (--vocab-size)")
    cases["parquet-empty-document"] = (write_parquet(tmp / "e.parquet", good[:2] + [[]] + good[2:]), (),
                                       "e.parquet: row 2 (from 0): an empty document")
    cases["jsonl-not-integers"] = (write_jsonl(tmp / "f.jsonl", good[:1] + [[1, 2.5]]), (),
                                   "f.jsonl: row 1 (from 0): 'tokens' must be a list of integer token ids")
    cases["jsonl-missing-column"] = (tmp / "m.jsonl", (), "m.jsonl: row 1 (from 0): missing 'tokens'")
    (tmp / "m.jsonl").write_text('{"tokens": [1, 2]}\n{"other": [1]}\n')
    bin_path = write_bin(tmp / "t.bin", good, offsets=False)
    with open(bin_path, "ab") as handle:
        handle.write(b"\x01")  # half a uint16
    size = bin_path.stat().st_size
    cases["bin-truncated"] = (bin_path, (), f"t.bin: truncated: {size} bytes is not a whole number of uint16 tokens")
    write_bin(tmp / "o.bin", [[1, 2, 3], [4, 5]])
    np.save(tmp / "o.offsets.npy", np.array([0, 3, 3], dtype=np.int64))
    cases["bin-empty-document"] = (tmp / "o.bin", (), "o.offsets.npy: document 1 (from 0) starts at token 3 and "
                                                      "ends at 3: an empty document")
    write_bin(tmp / "i.bin", [[1, 2, 3, 12, 4]], offsets=False)
    cases["bin-id-outside-vocab"] = (tmp / "i.bin", (), "i.bin: token 3 (byte offset 6): token id 12 is outside "
                                                        "[0, 10)")
    (tmp / "nul.txt").write_bytes(b"abc\x00def")
    cases["text-nul"] = (tmp / "nul.txt", ("--vocab-size", "8"), "nul.txt: byte offset 3 is NUL (0)")
    return cases


BAD = ["jsonl-id-outside-vocab", "parquet-empty-document", "jsonl-not-integers", "jsonl-missing-column",
       "bin-truncated", "bin-empty-document", "bin-id-outside-vocab", "text-nul"]


@pytest.mark.parametrize("case", BAD)
def test_bad_token_data_is_one_line_naming_the_file_and_place(case, tmp_path):
    path, extra, message = bad_cases(tmp_path)[case]
    extra = () if case == "text-nul" else ("--vocab-size", "10")
    extra += ("--sequence-column", "tokens") if path.suffix in (".jsonl", ".parquet") else ()
    proc = run_here(lm_args([path], tmp_path / "run", "--seq-len", "4", "--max-steps", "1",
                            "--data-cache", str(tmp_path / "cache"), *extra))
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and message in err, (proc.returncode, err)
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


@pytest.mark.parametrize("extra, option, message", [
    ((), "--data-files", "--task lm learns your tokens: give token files"),
    (("--data-files", "{tmp}/a.csv"), "--data-files", "--task lm reads token files (.bin, .parquet, .jsonl) or "
                                                      "text files (.txt) (got .csv)"),
    (("--data-files", "{tmp}/a.txt,{tmp}/a.jsonl"), "--data-files", "give either text files (.txt) or token files"),
    (("--data-files", "{tmp}/a.txt", "--vocab-size", "300"), "--vocab-size", "300, but the text's ids come from "
                                                                             "bytes, 256 of them"),
    (("--data-files", "{tmp}/a.jsonl", "--tokenizer", "{tmp}/tok.json"), "--tokenizer", "reads text files (.txt)"),
    (("--data-files", "{tmp}/a.jsonl", "--vocab-size", "10", "--eod-id", "10"), "--eod-id",
     "10 is outside the vocabulary [0, 10)"),
    (("--data-files", "{tmp}/a.txt", "--tokenizer", "{tmp}/missing.json"), "--tokenizer", "missing.json: cannot be "
                                                                                          "read as a tokenizer.json"),
    (("--data-files", "{tmp}/a.txt", "--eval-share", "0.5", "--eval-files", "{tmp}/a.txt"), "--eval-share",
     "give one of them"),
    (("--data-files", "{tmp}/a.txt", "--min-seq-len", "2"), "--min-seq-len", "the lm task has a fixed length"),
    (("--data-files", "{tmp}/a.txt", "--data-streaming"), "--data-streaming", "leave it out"),
    (("--data-files", "{tmp}/a.txt", "--eval-share", "0.99", "--seq-len", "2"), "--eval-share",
     "nothing is left to train on"),
])
def test_lm_options_are_checked_before_anything_is_written(extra, option, message, tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "a.csv").write_text("1,2")
    write_jsonl(tmp_path / "a.jsonl", [[1, 2, 3]])
    args = [a.format(tmp=tmp_path) for a in extra]
    proc = run_here([*LM, "--run-dir", str(tmp_path / "run"), "--seq-len", "4", *args])
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"distseq train: error: {option}") and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value", [("--tokenizer", "tok.json"), ("--eod-id", "1"), ("--packing", "document"),
                                           ("--token-dtype", "uint32")])
def test_token_options_are_refused_where_they_do_not_apply(option, value, tmp_path):
    proc = run_here(["train", "--task", "induction", "--run-dir", str(tmp_path / "run"), option, value])
    assert proc.returncode == 2 and f"error: {option}: applies to --task lm's --data-files" in proc.stderr


# --- a tokenizer.json ---------------------------------------------------------------------------
def word_tokenizer(path: Path, text: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    tokenizer.save(str(path))
    return path


def test_a_tokenizer_json_reads_text_and_a_non_utf8_byte_is_one_line(tmp_path):
    text = english(50)
    tok = word_tokenizer(tmp_path / "tokenizer.json", text)
    (tmp_path / "a.txt").write_text(text)
    run_dir = tmp_path / "run"
    proc = run_here(lm_args([tmp_path / "a.txt"], run_dir, "--tokenizer", str(tok), "--seq-len", "8",
                            "--global-batch-size", "4", "--max-steps", "2", "--eval-every", "0"))
    assert_ok(proc)
    config = json.loads((run_dir / "config.json").read_text())["data"]
    from tokenizers import Tokenizer

    loaded = Tokenizer.from_file(str(tok))
    assert config["vocab_size"] == loaded.get_vocab_size() and config["eod_id"] == loaded.token_to_id("<|endoftext|>")
    words = len(text.split()) + text.count(".")
    assert f"{words + 1} tokens in 1 document(s)" in proc.stdout
    (tmp_path / "bad.txt").write_bytes(text[:100].encode() + b"\xff" + b"more")
    proc = run_here(lm_args([tmp_path / "bad.txt"], tmp_path / "run2", "--tokenizer", str(tok), "--seq-len", "8"))
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "bad.txt: byte offset 100 is not UTF-8" in err, err
    assert not (tmp_path / "run2").exists()


# --- resume -------------------------------------------------------------------------------------
RESUME = ["--seq-len", "8", "--global-batch-size", "12", "--verify-data", "--hidden-size", "16", "--num-layers",
          "1", "--log-every", "1", "--eval-every", "0"]


def corpus(tmp_path):
    documents = random_documents(60, 40, seed=5)
    return [write_jsonl(tmp_path / "a.jsonl", documents[:30]), write_bin(tmp_path / "b.bin", documents[30:])]


@pytest.mark.slow
@pytest.mark.multiproc
def test_elastic_resume_on_token_files_continues_at_the_next_window(tmp_path):
    """2 -> 1 -> 3 processes: each part reads exactly the next positions (--verify-data), and the end equals an
    uninterrupted single-process run to float rounding."""
    files = corpus(tmp_path)
    common = [*RESUME, "--vocab-size", "41", "--eod-id", "40", "--sequence-column", "tokens"]
    reference = tmp_path / "reference"
    assert_ok(run_here(lm_args(files, reference, *common, "--max-steps", "12")))
    run_dir = tmp_path / "run"
    for part, (world, until) in enumerate([(2, 4), (1, 8), (3, 12)]):
        args = lm_args(files, run_dir, *common, "--max-steps", str(until), "--checkpoint-every", "4")
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
        merged = None
        for digest in (Digest(**d) for d in result["data_accounting"]["per_rank"]):
            merged = digest if merged is None else merged.merge(digest)
        assert merged == Digest.of_range(start * 12, until * 12), part
    end, expected = weights_at(run_dir, 12), weights_at(reference, 12)
    for key in expected:
        torch.testing.assert_close(end[key], expected[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_killed_lm_run_resumes_bit_exact_and_refuses_other_tokens(tmp_path):
    files = corpus(tmp_path)
    common = [*RESUME, "--vocab-size", "41", "--eod-id", "40", "--sequence-column", "tokens", "--max-steps", "16",
              "--checkpoint-every", "4", "--num-workers", "1"]
    reference = tmp_path / "reference"
    assert_ok(run_here(lm_args(files, reference, *common)))
    run_dir = tmp_path / "run"
    proc = run_until([*DISTSEQ, *lm_args(files, run_dir, *common)], "step=10/",
                     lambda p: p.send_signal(signal.SIGKILL), tmp_path / "logs")
    assert proc.returncode == -signal.SIGKILL
    rerun = run_here(lm_args(files, run_dir, *common))
    assert_ok(rerun)
    assert "resuming from" in rerun.stdout
    assert_bit_identical(weights_at(run_dir, 16), weights_at(reference, 16))
    # other bytes (one id changed in the .bin: the same size) are refused by the checkpoint
    tokens = np.fromfile(files[1], dtype=np.uint16)
    tokens[3] = (tokens[3] + 1) % 40
    tokens.tofile(files[1])
    again = run_here(lm_args(files, run_dir, *common[:-4], "--max-steps", "20", "--checkpoint-every", "4"))
    assert again.returncode == 2 and "was trained on other data" in again.stderr, again.stderr[-2000:]


# --- per-position labels from files -----------------------------------------------------------------
MQAR_SPEC = dict(seq_len=32, vocab_size=32, num_kv_pairs=4)
MQAR_ARGS = ["--preset", "mqar", "--seq-len", "32", "--vocab-size", "32", "--num-kv-pairs", "4", "--short-conv", "3",
             "--no-progress", "--checkpoint-every", "0", "--log-every", "50", "--eval-size", "256", "--eval-every", "0"]


def mqar_samples(n, seed=0):
    from distseq.registry import TASKS
    from distseq.tasks import spec_for

    batch = TASKS["mqar"].make(torch.Generator().manual_seed(seed), n, spec_for("mqar", **MQAR_SPEC))
    return batch["x"].tolist(), batch["y"].tolist()


def test_per_position_labels_read_back_exactly_with_minus_100_or_null(tmp_path):
    from distseq.data.index import open_index
    from distseq.registry import TASKS
    from distseq.tasks import spec_for

    x, y = mqar_samples(50)
    pq.write_table(pa.table({"sequence": x, "label": y}), tmp_path / "a.parquet")
    with open(tmp_path / "b.jsonl", "w") as handle:  # null where there is no label
        for ids, labels in zip(x, y):
            handle.write(json.dumps({"sequence": ids, "label": [None if v == IGNORE else v for v in labels]}) + "\n")
    for name in ("a.parquet", "b.jsonl"):
        index = open_index([str(tmp_path / name)], TASKS["mqar"], spec_for("mqar", **MQAR_SPEC), "sequence", "label",
                           str(tmp_path / "cache"), say=lambda line: None, progress=False)
        batch = index.take(torch.arange(50))
        assert batch["x"].dtype == torch.int64 and batch["x"].tolist() == x
        assert batch["y"].dtype == torch.int64 and batch["y"].tolist() == y


@pytest.mark.slow
def test_mqar_from_a_parquet_file_trains_like_the_synthetic_stream_of_the_same_samples(tmp_path):
    """The synthetic stream's first 2,048 samples (the task's own generator) written as parquet (per-position
    labels, -100 elsewhere) against --dataset-size 2048 of that stream: the same samples in another order, both
    evaluated on the task's held-out set, reach the same accuracy."""
    from distseq.data.stream import SampleSource
    from distseq.tasks import spec_for

    drawn = SampleSource("mqar", spec_for("mqar", **MQAR_SPEC), 0, 2048, "train").samples(torch.arange(2048))
    x, y = drawn["x"].tolist(), drawn["y"].tolist()  # the synthetic stream's first 2,048 samples (seed 0)
    pq.write_table(pa.table({"sequence": x, "label": y}), tmp_path / "mqar.parquet")
    common = [*MQAR_ARGS, "--max-steps", "200", "--global-batch-size", "32", "--warmup-steps", "50", "--seed", "0"]
    stream = run_here(["train", *common, "--dataset-size", "2048", "--block-size", "2048", "--run-dir",
                       str(tmp_path / "stream")])
    files = run_here(["train", *common, "--data-files", str(tmp_path / "mqar.parquet"), "--run-dir",
                      str(tmp_path / "files")])
    assert_ok(stream)
    assert_ok(files)
    a, b = summary(tmp_path / "stream")["eval/accuracy"], summary(tmp_path / "files")["eval/accuracy"]
    assert a > 0.95 and abs(a - b) < 0.03, (a, b)  # measured: 1.0 and 1.0


LABEL_CASES = [
    ("short", lambda ids, labels: labels[:-1], "'label' holds 31 labels for a sequence of 32"),
    ("nan", lambda ids, labels: labels[:2] + [float("nan")] + labels[3:], "'label' holds nan at position 2"),
    ("infinite", lambda ids, labels: labels[:2] + [float("inf")] + labels[3:], "'label' holds inf at position 2"),
    ("outside", lambda ids, labels: labels[:5] + [32] + labels[6:], "'label' holds 32 at position 5: a label is a "
                                                                    "class in 0..31 for --task mqar"),
    ("not-a-list", lambda ids, labels: 3, "'label' must be a list of labels"),
]


# a parquet column holds one type: a number among lists cannot be written there
LABEL_FILES = [(fmt, *case) for fmt in ("jsonl", "parquet") for case in LABEL_CASES
               if (fmt, case[0]) != ("parquet", "not-a-list")] + [("streamed", *LABEL_CASES[1])]


@pytest.mark.parametrize("fmt, case, change, message", LABEL_FILES, ids=[f"{c[0]}-{c[1]}" for c in LABEL_FILES])
def test_a_bad_label_list_is_one_line_naming_the_file_and_row(fmt, case, change, message, tmp_path):
    x, y = mqar_samples(6)
    rows = [{"sequence": ids, "label": change(ids, labels) if i == 4 else labels}
            for i, (ids, labels) in enumerate(zip(x, y))]
    path = tmp_path / f"bad.{'parquet' if fmt == 'parquet' else 'jsonl'}"
    if fmt == "parquet":
        pq.write_table(pa.table({"sequence": [r["sequence"] for r in rows], "label": [r["label"] for r in rows]}), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    streamed = ["--data-streaming", "--global-batch-size", "4"] if fmt == "streamed" else []
    proc = run_here(["train", *MQAR_ARGS, "--data-files", str(path), "--run-dir", str(tmp_path / "run"),
                     "--data-cache", str(tmp_path / "cache"), "--max-steps", "2", *streamed])
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"{path.name}: row 4 (from 0): {message}" in err, err
    assert fmt == "streamed" or not (tmp_path / "run").exists()  # streamed: found when the row is reached


def test_a_token_id_outside_the_vocabulary_in_a_row_file_names_the_row(tmp_path):
    x, y = mqar_samples(3)
    x[1][7] = 40
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"sequence": a, "label": b}) + "\n" for a, b in zip(x, y)))
    proc = run_here(["train", *MQAR_ARGS, "--data-files", str(path), "--run-dir", str(tmp_path / "run"),
                     "--data-cache", str(tmp_path / "cache"), "--max-steps", "1"])
    assert proc.returncode == 2 and "ids.jsonl: row 1 (from 0): 'sequence' holds a token id outside [0, 32)" in \
        proc.stderr, proc.stderr


def test_a_bin_files_offsets_are_part_of_its_identity(tmp_path, monkeypatch):
    """The offsets file settling (its stat trusted later) is no change; other offsets are, under a running job and
    at the next start, which indexes the file again with their documents."""
    from distseq.data import filestat

    documents = random_documents(6, 20, seed=2, low=3)
    path = write_bin(tmp_path / "a.bin", documents)
    monkeypatch.setattr(filestat, "RACY_NS", 10**15)  # every stat just taken: recorded without its ctime
    index = token_index([path], tmp_path, vocab=21, seq_len=4, eod=20)
    monkeypatch.setattr(filestat, "RACY_NS", 0)  # now every stat is settled
    assert index.changed() is None
    np.save(path.with_suffix(".offsets.npy"), np.array([0, len(documents[0])], dtype=np.int64))
    assert index.changed() == f"{path.with_suffix('.offsets.npy')} changed"
    said = []
    again = open_token_index([str(path)], index.layout, None, 4, "packed", str(tmp_path / "cache"), said.append,
                             progress=False)
    assert again.documents == 2 and any("has another a.offsets.npy since it was indexed" in line for line in said)
    assert again.identity()["sha256"] != index.identity()["sha256"]
    assert again.files[0].arrow != index.files[0].arrow  # never the name a running job mapped


def test_eval_files_are_evaluated_in_order_and_distseq_eval_reports_the_perplexity(tmp_path):
    """--eval-files replace the held-out share (nothing of --data-files is held out); `distseq eval` of a run
    without them evaluates the same held-out share the run did, and writes the perplexity."""
    (tmp_path / "train.txt").write_text(english(60, seed=1))
    (tmp_path / "valid.txt").write_text(english(10, seed=2))
    common = ["--seq-len", "16", "--global-batch-size", "8", "--max-steps", "4", "--eval-every", "0"]
    with_files = run_here(lm_args([tmp_path / "train.txt"], tmp_path / "a", *common, "--eval-files",
                                  str(tmp_path / "valid.txt"), "--eval-size", "10"))
    assert_ok(with_files)
    assert "held out" not in with_files.stdout
    assert summary(tmp_path / "a")["eval/samples"] == 10  # --eval-size caps the valid file's windows
    shared = run_here(lm_args([tmp_path / "train.txt"], tmp_path / "b", *common, "--eval-share", "0.1"))
    assert_ok(shared)
    windows = math.ceil(len((tmp_path / "train.txt").read_bytes()) / 16)  # + the end-of-document byte, - 1
    held = math.ceil(0.1 * windows)
    assert f"; {held} held out" in shared.stdout and summary(tmp_path / "b")["eval/samples"] == held
    proc = run_here(["eval", "--run-dir", str(tmp_path / "b"), "--output", str(tmp_path / "eval.json")])
    assert_ok(proc)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["samples"] == held and result["data"] == f"the last {held} of {windows} samples of --data-files"
    assert result["loss"] == pytest.approx(summary(tmp_path / "b")["eval/loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)


def test_row_files_take_eval_files_and_a_held_out_share_too(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"sequence": rng.normal(size=6).tolist()} for _ in range(40)]
    for row in rows:
        row["label"] = int(sum(row["sequence"]) > 0)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    common = ["train", "--data-files", str(tmp_path / "a.jsonl"), "--seq-len", "6", "--global-batch-size", "4",
              "--max-steps", "2", "--eval-every", "0", "--no-progress", "--checkpoint-every", "0"]
    proc = run_here([*common, "--eval-files", str(tmp_path / "b.jsonl"), "--run-dir", str(tmp_path / "r1")])
    assert_ok(proc)
    assert summary(tmp_path / "r1")["eval/samples"] == 10
    proc = run_here([*common, "--eval-share", "0.2", "--run-dir", str(tmp_path / "r2")])
    assert_ok(proc)
    assert "; 6 held out" in proc.stdout and summary(tmp_path / "r2")["eval/samples"] == 6
    bad = run_here([*common, "--eval-files", str(tmp_path / "missing.jsonl"), "--run-dir", str(tmp_path / "r3")])
    assert bad.returncode == 2 and "error: --eval-files: no such file" in bad.stderr
    assert not (tmp_path / "r3").exists()


# --- what the files decide is recorded, and checked on resume -------------------------------------------
def test_a_resume_that_would_move_the_held_out_boundary_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text(english(30))
    (tmp_path / "v.txt").write_text(english(5, seed=1))
    common = ["--seq-len", "16", "--global-batch-size", "4", "--eval-every", "0", "--checkpoint-every", "2"]
    assert_ok(run_here(lm_args([tmp_path / "a.txt"], tmp_path / "run", *common, "--max-steps", "2")))
    config = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert (config["eval_share"], config["tokenizer"], config["eod_id"]) == (0.05, "bytes", 0)
    proc = run_here(lm_args([tmp_path / "a.txt"], tmp_path / "run", *common, "--max-steps", "4", "--eval-files",
                            str(tmp_path / "v.txt")))
    assert proc.returncode == 2 and "was written with --eval-share 0.05; this run has None" in proc.stderr, \
        proc.stderr
    assert_ok(run_here(lm_args([tmp_path / "a.txt"], tmp_path / "run", *common, "--max-steps", "4")))


def test_a_tokenizer_is_its_bytes_not_its_path(tmp_path):
    """A copy at another path resumes (and generates); the same path with other ids is other data, refused by
    a resume and by generate."""
    text = english(40)
    (tmp_path / "a.txt").write_text(text)
    tok = word_tokenizer(tmp_path / "tokenizer.json", text)
    common = ["--seq-len", "8", "--global-batch-size", "4", "--eval-every", "0", "--checkpoint-every", "2"]
    run_dir = tmp_path / "run"
    assert_ok(run_here(lm_args([tmp_path / "a.txt"], run_dir, *common, "--max-steps", "2", "--tokenizer", str(tok))))
    copy = tmp_path / "copy.json"
    copy.write_bytes(tok.read_bytes())
    moved = run_here(lm_args([tmp_path / "a.txt"], run_dir, *common, "--max-steps", "4", "--tokenizer", str(copy)))
    assert_ok(moved)
    assert "resuming from" in moved.stdout
    spec = json.loads(tok.read_text())
    vocab = spec["model"]["vocab"]
    a, b = "the", "fox"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same size, other ids
    copy.write_text(json.dumps(spec))
    refused = run_here(lm_args([tmp_path / "a.txt"], run_dir, *common, "--max-steps", "6", "--tokenizer", str(copy)))
    assert refused.returncode == 2 and "was trained on other data" in refused.stderr, refused.stderr
    checkpoint = run_dir / "checkpoints" / "step-00000004"
    proc = run_here(["generate", "--checkpoint", str(checkpoint), "--prompt", "the", "--max-new-tokens", "2"])
    assert proc.returncode == 2 and "is not the tokenizer.json the run trained with" in proc.stderr, proc.stderr


def test_a_tokenizer_reads_a_file_as_it_reads_a_prompt(tmp_path):
    """The whole text at once: a pre-tokenizer that marks the start of the text would mark every line if the file
    were encoded line by line."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from distseq.data.text import TokenizerCodec

    text = "one two\nthree four\n\nfive\n"
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer.save(str(tmp_path / "t.json"))
    codec = TokenizerCodec(str(tmp_path / "t.json"))
    assert codec.encode_file(text.encode(), "t.txt").tolist() == codec.encode(text) == \
        tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("files, extra, option, message", [
    (["a.txt"], ("--token-dtype", "uint32"), "--token-dtype", "is the id type of .bin files; none is given"),
    (["a.bin"], ("--sequence-column", "ids", "--vocab-size", "10"), "--sequence-column",
     "names the column of parquet or JSON-lines files"),
    (["a.txt"], ("--label-column", "y"), "--label-column", "--task lm's labels are the next tokens"),
    (["a.txt"], ("--eod-id", "10"), "--eod-id", "byte-level text ends each document with byte 0"),
    (["a.txt"], ("--eval-files", "{tmp}/a.bin"), "--eval-files", "hold token ids, the run's --data-files text"),
    (["a.txt"], ("--eval-files", "{tmp}/a.txt,{tmp}/a.bin"), "--eval-files", "give either text files"),
    (["empty.parquet"], ("--vocab-size", "10", "--sequence-column", "tokens"), "", "empty.parquet has no documents"),
    (["blank.jsonl"], ("--vocab-size", "10"), "", "blank.jsonl has no documents"),
    (["zero.jsonl"], ("--vocab-size", "10"), "", "zero.jsonl has no documents"),
    (["a.txt"], ("--eval-files", "{tmp}/nul.txt"), "", "nul.txt: byte offset 1 is NUL"),  # before the run dir
    (["tiny.txt"], (), "--eval-share", "0.05 (--task lm's default without --eval-files) of 1 samples holds out 1"),
    (["a.bin"], ("--vocab-size", "10"), "", "a.offsets.npy: document 1 (from 0) starts at token 9, past the file's 4 "
                                            "tokens"),
])
def test_options_and_files_that_do_not_fit_are_one_line_and_create_nothing(files, extra, option, message, tmp_path):
    (tmp_path / "a.txt").write_text(english(5))
    (tmp_path / "tiny.txt").write_text("hi")
    (tmp_path / "nul.txt").write_bytes(b"a\x00b")
    write_bin(tmp_path / "a.bin", [[1, 2, 3, 4]], offsets=False)
    np.save(tmp_path / "a.offsets.npy", np.array([0, 9], dtype=np.int64))
    write_parquet(tmp_path / "empty.parquet", [])
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    (tmp_path / "zero.jsonl").write_text("")
    args = [a.format(tmp=tmp_path) for a in extra]
    proc = run_here(lm_args([tmp_path / f for f in files], tmp_path / "run", "--seq-len", "4", "--max-steps", "1",
                            "--data-cache", str(tmp_path / "cache"), *args))
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"distseq train: error: {option}") and message in err, err  # data: the file, not an option
    assert not (tmp_path / "run").exists()


def test_held_out_figures_of_a_language_model_are_per_token():
    """Windows with 3 and 1 labelled tokens: the loss is the mean over the 4 tokens, not over the 2 windows."""
    from accelerate import Accelerator

    from distseq.registry import TASKS
    from distseq.training.evaluation import evaluate

    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[1, 2, 3], [4, IGNORE, IGNORE]])

    class Fixed(torch.nn.Module):
        def forward(self, x, lengths=None):
            return logits[: len(x)]

    batch = {"x": torch.zeros(2, 3, dtype=torch.int64), "y": y, "index": torch.arange(2)}
    out = evaluate(Accelerator(cpu=True), Fixed(), TASKS["lm"], [batch], 2, False)
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), y.reshape(-1), ignore_index=IGNORE)
    assert out["eval/loss"] == pytest.approx(per_token.item(), rel=1e-6)
    right = (logits.argmax(-1) == y)[y != IGNORE].float().mean().item()
    assert out["eval/accuracy"] == pytest.approx(right) and out["eval/perplexity"] == pytest.approx(
        math.exp(per_token.item()), rel=1e-6)


def test_distseq_eval_reads_files_of_the_runs_kind(tmp_path):
    """A per-step task's row files evaluate (every row once); a text run refuses token files, and a token run text."""
    x, y = mqar_samples(40)
    pq.write_table(pa.table({"sequence": x, "label": y}), tmp_path / "mqar.parquet")
    assert_ok(run_here(["train", *MQAR_ARGS, "--data-files", str(tmp_path / "mqar.parquet"), "--max-steps", "2",
                        "--global-batch-size", "8", "--run-dir", str(tmp_path / "mqar")]))
    proc = run_here(["eval", "--run-dir", str(tmp_path / "mqar"), "--data-files", str(tmp_path / "mqar.parquet"),
                     "--output", str(tmp_path / "mqar.json")])
    assert_ok(proc)
    assert json.loads((tmp_path / "mqar.json").read_text())["samples"] == 40
    (tmp_path / "a.txt").write_text(english(20))
    write_bin(tmp_path / "a.bin", [[1, 2, 3, 4, 5]], offsets=False)
    assert_ok(run_here(lm_args([tmp_path / "a.txt"], tmp_path / "text", "--seq-len", "8", "--max-steps", "1",
                               "--global-batch-size", "2", "--eval-every", "0")))
    assert_ok(run_here(lm_args([tmp_path / "a.bin"], tmp_path / "ids", "--seq-len", "2", "--max-steps", "1",
                               "--global-batch-size", "2", "--eval-every", "0", "--vocab-size", "8")))
    for run, files, message in (("text", "a.bin", "hold token ids, the run's --data-files text"),
                                ("ids", "a.txt", "hold text, the run's --data-files token ids")):
        proc = run_here(["eval", "--run-dir", str(tmp_path / run), "--data-files", str(tmp_path / files),
                         "--output", str(tmp_path / f"{run}.json")])
        assert proc.returncode == 2 and f"error: --data-files: {message}" in proc.stderr, proc.stderr
        assert not (tmp_path / f"{run}.json").exists()
