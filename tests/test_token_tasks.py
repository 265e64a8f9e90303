"""Token tasks (mqar, induction, selective-copy) and the models that read tokens.

- labels recomputed from the inputs by an independent loop over samples, written from each task's
  documented rule (never calling ``task.label``), plus ``task.label(x) == y`` on thousands of samples,
  at ordinary and edge shapes, and the documented distributions checked with generous margins;
- ``distseq check-task`` on a token task, and broken token tasks reported by it;
- causality proven: changing a future input never changes an earlier logit (decoder with every
  position encoding, on tokens and on features; rnn, gru and lstm);
- one short training per task x model kind, with the throughput figures of summary.json and the
  TensorBoard scalars checked against their definitions;
- one task learned well above chance; resuming on the token path; predict, export and probe.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from causality import assert_causal, change_features, change_token, model_for
from conftest import REPO, checkpoint_weights, cpu_env, run_main, scalars, summary

from distseq.config import TrainConfig
from distseq.data.contract import PROPERTIES, check_task
from distseq.models import build_model
from distseq.models.flops import flops_per_token, matmul_params
from distseq.registry import TASKS
from distseq.tasks import IGNORE, TaskSpec
from distseq.tasks.tokens import POWER_A

TOKEN_TASKS = ("mqar", "induction", "selective-copy")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread, as the subprocess runs of the other tests have (cpu_env): bit-comparable
    with them, and not slowed tenfold by spinning threads when the machine's cores are busy."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set_cpu_threads() then leaves torch's count alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
MODEL_KINDS = ("decoder", "lstm", "gru", "rnn", "transformer")


def draw(task: str, n: int, spec: TaskSpec, seed: int = 0):
    out = TASKS[task].make(torch.Generator().manual_seed(seed), n, spec)
    assert set(out) == {"x", "y"}
    x, y = out["x"], out["y"]
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == (n, spec.seq_len) and y.shape == (n, spec.seq_len)
    return x, y


def spec_of(seq_len: int, vocab_size: int, copy_len: int = 5, num_kv_pairs: int = 8) -> TaskSpec:
    return TaskSpec(seq_len, seq_len, vocab_size, copy_len=copy_len, num_kv_pairs=num_kv_pairs)


# --- labels, recomputed independently ----------------------------------------------------------------
def mqar_reference(row: list, spec: TaskSpec) -> list:
    """y of one mqar sample from its tokens, straight from the documented rule, asserting the rule's
    promises on the way: the pairs, each key once more at an even offset 2m + 2g (g < (T - 2m) // 2),
    and noise (uniform over the tokens that are not the sample's keys) everywhere else."""
    T, m, V = spec.seq_len, spec.num_kv_pairs, spec.vocab_size
    half = V // 2
    keys, values = row[0:2 * m:2], row[1:2 * m:2]
    assert len(set(keys)) == m and all(1 <= k < half for k in keys), keys
    assert len(set(values)) == m and all(half <= v < V for v in values), values
    value_of = dict(zip(keys, values))
    counts = Counter(row)
    y = [IGNORE] * T
    for position in range(2 * m, T):
        token = row[position]
        assert 0 <= token < V
        if token in value_of:  # a key after the pairs is always a query: noise never draws a key
            offset = position - 2 * m
            assert offset % 2 == 0 and offset // 2 < (T - 2 * m) // 2, (position, row)
            y[position] = value_of[token]
    for key in keys:
        assert counts[key] == 2, (key, row)  # its pair, then its query
    return y


def mqar_gaps(row: list, spec: TaskSpec) -> list:
    """Each key's gap g_j (its query is at 2m + 2 g_j), in the pairs' order."""
    m = spec.num_kv_pairs
    keys = row[0:2 * m:2]
    return [(row.index(key, 2 * m) - 2 * m) // 2 for key in keys]


def induction_reference(row: list, spec: TaskSpec) -> list:
    T, V = spec.seq_len, spec.vocab_size
    assert all(0 <= t < V for t in row)
    trigger = row[-1]
    where = [p for p in range(T - 1) if row[p] == trigger]
    assert len(where) == 1, row  # A exactly twice: once in the context, once at the end
    p = where[0]
    assert p <= T - 3, row
    target = row[p + 1]
    assert target != trigger
    return [IGNORE] * (T - 1) + [target]


def selective_copy_reference(row: list, spec: TaskSpec) -> list:
    T, c, V = spec.seq_len, spec.copy_len, spec.vocab_size
    context, markers = row[:T - c], row[T - c:]
    assert markers == [V - 1] * c, row
    data = [t for t in context if t != 0]
    assert len(data) == c, row  # exactly copy_len data tokens, noise (0) elsewhere
    assert all(1 <= t <= V - 2 for t in data), row
    return [IGNORE] * (T - c) + data


REFERENCES = {"mqar": mqar_reference, "induction": induction_reference, "selective-copy": selective_copy_reference}

# (task, spec): an ordinary shape and the edge shapes each rule allows
SHAPES = [
    ("mqar", spec_of(64, 32, num_kv_pairs=4)),
    ("mqar", spec_of(16, 10, num_kv_pairs=4)),  # 4m == T: every query slot taken; V = 2m + 2: every key used
    ("mqar", spec_of(13, 7, num_kv_pairs=2)),  # odd T (one position after the last slot) and odd V
    ("mqar", spec_of(128, 512, num_kv_pairs=8)),  # the preset's shape
    ("mqar", spec_of(256, 300, num_kv_pairs=64)),
    ("mqar", spec_of(512, 258, num_kv_pairs=128)),  # 128 pairs: past what an int8 table of key indices holds
    ("induction", spec_of(16, 8)),
    ("induction", spec_of(3, 3)),  # A B A: nothing else fits
    ("induction", spec_of(64, 32)),
    ("selective-copy", spec_of(12, 6, copy_len=3)),
    ("selective-copy", spec_of(8, 3, copy_len=4)),  # T == 2c: a context of data only; V == 3: one data token
    ("selective-copy", spec_of(256, 16, copy_len=16)),
]
SHAPE_IDS = [f"{t}-T{s.seq_len}-V{s.vocab_size}-c{s.copy_len}-m{s.num_kv_pairs}" for t, s in SHAPES]


@pytest.mark.parametrize("task,spec", SHAPES, ids=SHAPE_IDS)
def test_labels_follow_the_documented_rule(task, spec):
    """A plain loop over a few hundred samples, written from the rule, gives make()'s y; and the task's
    own vectorised label() gives y on thousands."""
    x, y = draw(task, 300, spec, seed=1)
    reference = REFERENCES[task]
    for i, (row, labels) in enumerate(zip(x.tolist(), y.tolist())):
        assert labels == reference(row, spec), f"sample {i}: {row}"
    x, y = draw(task, 5000, spec, seed=2)
    assert torch.equal(TASKS[task].label(x, None, spec), y)
    answers = (y != IGNORE).sum(1)
    expected = {"mqar": spec.num_kv_pairs, "induction": 1, "selective-copy": spec.copy_len}[task]
    assert bool((answers == expected).all())  # every sample carries exactly its answers


def test_task_label_rules_are_documented():
    for task in TOKEN_TASKS:
        t = TASKS[task]
        assert t.tokens and t.head == "per-step" and t.label is not None and t.label_rule
        spec = spec_of(16, 12, copy_len=3, num_kv_pairs=2)
        assert t.vocab(spec) == 12 and t.num_outputs(spec) == 12
        x = t.example_input(4, spec)
        assert x.dtype == torch.int64 and x.shape == (4, 16) and 0 <= int(x.min()) and int(x.max()) < 12


def test_make_is_a_pure_function_of_the_generator():
    for task, spec in SHAPES[:1] + SHAPES[4:5] + SHAPES[7:8]:
        a, b = draw(task, 500, spec, seed=7), draw(task, 500, spec, seed=7)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        c = draw(task, 500, spec, seed=8)
        assert not torch.equal(a[0], c[0])


# --- distributions -----------------------------------------------------------------------------------
def assert_uniform(counts: Counter, support, tolerance: float) -> None:
    """Each value of ``support`` within ``tolerance`` (relative) of the mean count, nothing outside it."""
    assert set(counts) <= set(support), sorted(set(counts) - set(support))
    expected = sum(counts.values()) / len(support)
    for value in support:
        assert abs(counts[value] - expected) <= tolerance * expected, (value, counts[value], expected)


def test_mqar_keys_values_and_noise_are_uniform():
    spec = spec_of(64, 32, num_kv_pairs=4)
    m, V, half = 4, 32, 16
    x, y = draw("mqar", 6000, spec, seed=3)
    keys, values = x[:, 0:2 * m:2], x[:, 1:2 * m:2]
    # 24000 keys over 15 ids: ~1600 each, sd ~40; 24000 values over 16 ids: ~1500 each, sd ~38
    assert_uniform(Counter(keys.flatten().tolist()), range(1, half), 0.12)
    assert_uniform(Counter(values.flatten().tolist()), range(half, V), 0.12)
    # noise: uniform over the V - m tokens that are not the sample's keys, so a key-range id (a key of
    # m of the 15 rows' choices) appears with probability (1 - m / 15) / (V - m), any other with 1 / (V - m)
    noise = (y == IGNORE)
    noise[:, :2 * m] = False
    tokens = x[noise]
    n_noise = tokens.numel()
    counts = Counter(tokens.tolist())
    for token in range(V):
        p = (1 - m / (half - 1)) / (V - m) if 1 <= token < half else 1 / (V - m)
        expected = n_noise * p
        margin = 0.06 * expected + 5 * math.sqrt(expected)
        assert abs(counts[token] - expected) <= margin, (token, counts[token], expected)
    # and a sample's own keys are never noise
    is_key = (x[:, :, None] == keys[:, None, :]).any(-1)  # (n, T)
    assert not bool((is_key & noise).any())


def zoology_gaps(n: int, m: int, slots: int, seed: int) -> np.ndarray:
    """Zoology's own draw of query gaps: numpy's choice without replacement, P(g) ~ a (g + 1)^(a - 1)."""
    rng = np.random.default_rng(seed)
    p = POWER_A * np.arange(1, slots + 1) ** (POWER_A - 1)
    p = p / p.sum()
    return np.stack([rng.choice(slots, size=m, replace=False, p=p) for _ in range(n)])


def test_mqar_query_gaps_follow_zoologys_power_law():
    """Gaps skew to small values (gap 0 several times as frequent as the last gap), and both the
    inclusion frequency of every gap and the law of the first key's gap match numpy's successive
    sampling, Zoology's own draw, within a few standard errors."""
    spec = spec_of(64, 32, num_kv_pairs=4)
    m, slots, n = 4, (64 - 8) // 2, 6000
    x, _ = draw("mqar", n, spec, seed=4)
    ours = np.array([mqar_gaps(row, spec) for row in x.tolist()])  # (n, m)
    theirs = zoology_gaps(n, m, slots, seed=5)
    for table in (ours, theirs):
        assert all(len(set(row)) == m for row in table.tolist())
    ours_in = np.bincount(ours.ravel(), minlength=slots) / n  # P(gap g is used)
    theirs_in = np.bincount(theirs.ravel(), minlength=slots) / n
    assert ours_in[0] > 5 * ours_in[-1] and ours_in[0] > 0.4
    assert np.all(np.diff(ours_in[:4]) < 0)  # decreasing where the counts are large enough to tell
    se = np.sqrt(theirs_in * (1 - theirs_in) / n) * math.sqrt(2)
    assert np.all(np.abs(ours_in - theirs_in) <= 5 * se + 0.005), np.stack([ours_in, theirs_in])
    ours_first = np.bincount(ours[:, 0], minlength=slots) / n
    theirs_first = np.bincount(theirs[:, 0], minlength=slots) / n
    se = np.sqrt(theirs_first * (1 - theirs_first) / n) * math.sqrt(2)
    assert np.all(np.abs(ours_first - theirs_first) <= 5 * se + 0.005), np.stack([ours_first, theirs_first])


def test_induction_positions_and_tokens_are_uniform():
    spec = spec_of(10, 6)
    T, V, n = 10, 6, 12000
    x, y = draw("induction", n, spec, seed=6)
    trigger = x[:, -1]
    first = (x[:, :-1] == trigger[:, None]).to(torch.int8).argmax(1)
    target = y[:, -1]
    assert_uniform(Counter(trigger.tolist()), range(V), 0.1)  # ~2000 each
    assert_uniform(Counter(first.tolist()), range(T - 2), 0.1)  # p in [0, T - 3]: ~1500 each
    assert bool((target != trigger).all())
    # B, given A, is uniform over the other V - 1 tokens
    for a in range(V):
        rows = trigger == a
        assert_uniform(Counter(target[rows].tolist()), [b for b in range(V) if b != a], 0.25)  # ~400 each


def test_selective_copy_positions_and_tokens_are_uniform():
    spec = spec_of(12, 7, copy_len=3)
    T, c, V, n = 12, 3, 7, 9000
    x, _ = draw("selective-copy", n, spec, seed=7)
    context = x[:, :T - c]
    occupied = (context != 0).sum(0)  # each of the T - c positions holds data with probability c / (T - c)
    expected = n * c / (T - c)
    assert torch.all((occupied - expected).abs() <= 0.08 * expected), occupied
    assert_uniform(Counter(context[context != 0].tolist()), range(1, V - 1), 0.08)  # ~5400 each
    assert not bool((context == V - 1).any())


# --- check-task --------------------------------------------------------------------------------------
class TokenTask:
    """A well-behaved token task (a per-step 'repeat the previous token'); broken ones change one thing."""

    head = "per-step"

    def vocab(self, spec):
        return spec.vocab_size

    def num_outputs(self, spec):
        return spec.vocab_size

    def tokens(self, gen, n, spec):
        return torch.randint(0, spec.vocab_size, (n, spec.seq_len), generator=gen)

    def make(self, gen, n, spec):
        x = self.tokens(gen, n, spec)
        return {"x": x, "y": self.label(x, None, spec)}

    def label(self, x, lengths, spec):
        y = torch.full_like(x, IGNORE)
        y[:, 1:] = x[:, :-1]
        return y


class FloatTokens(TokenTask):
    def tokens(self, gen, n, spec):
        return super().tokens(gen, n, spec).to(torch.float32)


class IdPastVocabAtRow9(TokenTask):
    def tokens(self, gen, n, spec):
        x = super().tokens(gen, n, spec)
        x[9 % n, 2] = spec.vocab_size
        return x


class NegativeIdAtRow4(TokenTask):
    def tokens(self, gen, n, spec):
        x = super().tokens(gen, n, spec)
        x[4 % n, 0] = -1
        return x


def token_config(task: str, **data) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.task = task
    for name, value in {"seq_len": 8, "vocab_size": 6, "block_size": 100, **data}.items():
        setattr(cfg.data, name, value)
    return cfg.validate()


def test_a_good_token_plugin_task_keeps_the_contract(register):
    name = register("good-token-task", TokenTask())
    findings = check_task(token_config(name))
    assert [f.name for f in findings if not f.ok] == [], findings


@pytest.mark.parametrize("task_class, start", [
    (FloatTokens, "block 0, make(generator, 100, spec): x is (100, 8) float32; a token task needs (100, 8) int64"),
    (IdPastVocabAtRow9, "sample 9: x holds a token id outside [0, 6) (vocab)"),
    (NegativeIdAtRow4, "sample 4: x holds a token id outside [0, 6) (vocab)"),
])
def test_check_task_reports_a_broken_token_task(register, task_class, start):
    name = register("broken-token-task", task_class())
    findings = {f.name: f for f in check_task(token_config(name))}
    assert list(findings) == list(PROPERTIES)
    assert not findings["shapes"].ok
    assert findings["shapes"].detail.startswith(start), findings["shapes"].detail
    assert "\n" not in findings["shapes"].detail


@pytest.mark.slow
def test_cli_check_task_on_a_token_preset_passes(capsys):
    """``distseq check-task mqar`` takes the preset's shape (128 steps, 512 tokens, 8 pairs)."""
    proc = run_main(["check-task", "mqar"], capsys)
    assert proc.returncode in (0, None), proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("ok    shapes") and "x (1024, 64) int64 ids in [0, 128)" in lines[0]
    assert lines[-1] == f"task 'mqar': keeps the stream contract ({len(PROPERTIES)} properties)"


# --- causality ---------------------------------------------------------------------------------------
CAUSAL_SPEC = spec_of(12, 10, copy_len=3)  # selective-copy: any 12 ids in [0, 10) are valid inputs


@pytest.mark.parametrize("positions", ["rope", "learned", "sinusoidal"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("mode", ["eval-with-dropout", "train-without-dropout"])
def test_decoder_is_causal_on_tokens(positions, num_layers, mode):
    model = model_for("decoder", "selective-copy", CAUSAL_SPEC, positions=positions, num_layers=num_layers,
                      dropout=0.1 if mode == "eval-with-dropout" else 0.0)
    model.train(mode != "eval-with-dropout")
    if positions == "learned":
        with torch.no_grad():  # zeros at init: give them values so that positions matter
            model.positions.normal_(0, 0.5)
    x = torch.randint(0, 10, (4, 12), generator=torch.Generator().manual_seed(1))
    assert_causal(model, x, change_token(10))


@pytest.mark.parametrize("positions", ["rope", "learned", "sinusoidal"])
def test_decoder_is_causal_on_features(positions):
    spec = spec_of(12, 4, copy_len=3)  # the copy task: one-hot features (n, 12, 6), per-step head
    model = model_for("decoder", "copy", spec, positions=positions, num_layers=2).eval()
    x = torch.randn(3, 12, 6, generator=torch.Generator().manual_seed(2))
    assert_causal(model, x, change_features)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_unidirectional_recurrent_models_are_causal(kind):
    model = model_for(kind, "selective-copy", CAUSAL_SPEC, num_layers=2).eval()
    x = torch.randint(0, 10, (4, 12), generator=torch.Generator().manual_seed(3))
    assert_causal(model, x, change_token(10))
    features = model_for(kind, "copy", spec_of(12, 4, copy_len=3)).eval()
    assert_causal(features, torch.randn(3, 12, 6, generator=torch.Generator().manual_seed(4)), change_features)


def test_the_transformer_is_not_causal():
    """The encoder sees both directions (what makes the causal checks above able to fail)."""
    model = model_for("transformer", "selective-copy", CAUSAL_SPEC).eval()
    x = torch.randint(0, 10, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert not torch.equal(model(change_token(10)(x, 11))[:, 0], model(x)[:, 0])


def test_decoder_last_position_answers_and_padding_never_reaches_it():
    """A per-sequence head reads each sample's last valid position; what follows it changes nothing."""
    spec = TaskSpec(12, 4)
    model = model_for("decoder", "sum-sign", spec, positions="rope", num_layers=2).eval()
    x = torch.randn(5, 12, 1, generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([4, 7, 12, 9, 5])
    with torch.no_grad():
        base = model(x, lengths)
        assert base.shape == (5,)
        noisy = x.clone()
        for i, length in enumerate(lengths.tolist()):
            noisy[i, length:] = 100.0
        assert torch.equal(model(noisy, lengths), base)


def test_tied_embeddings_share_the_tensor():
    spec = spec_of(16, 40, num_kv_pairs=2)
    untied = model_for("decoder", "mqar", spec, positions="rope", num_layers=2)
    tied = model_for("decoder", "mqar", spec, positions="rope", num_layers=2, tie_embeddings=True)
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (shared parameters once)
    assert count(untied) - count(tied) == 40 * 16
    # a tied output layer is a matmul over the embedding table: the FLOP count keeps it
    assert matmul_params(tied) == matmul_params(untied)
    with torch.no_grad():  # one tensor: a change through the head is a change of the embedding
        tied.head.weight[3, 0] += 1.0
        assert tied.embed.weight[3, 0] == tied.head.weight[3, 0]
    loss = tied(torch.randint(0, 40, (2, 16))).sum()
    loss.backward()
    assert tied.embed.weight.grad is not None and tied.head.weight.grad is tied.embed.weight.grad


def test_flops_count_every_matmul_weight_of_the_transformer_and_lstm():
    """nn.MultiheadAttention keeps its input projection as a parameter of its own (not in a Linear):
    counted; the embedding table and position tables are not."""
    spec = spec_of(16, 40, num_kv_pairs=2)
    D, V = 16, 40
    for positions in ("sinusoidal", "learned"):
        model = model_for("transformer", "mqar", spec, positions=positions, num_layers=2)
        assert matmul_params(model) == 2 * (3 * D * D + D * D + 2 * 4 * D * D) + D * V
    lstm = model_for("lstm", "mqar", spec, num_layers=2)
    assert matmul_params(lstm) == 2 * (4 * D * D + 4 * D * D) + D * V  # input and hidden weights per layer


def test_a_sample_without_answers_is_neither_right_nor_solved():
    from distseq.tasks.base import per_step_scores

    logits, y = torch.randn(3, 4, 5), torch.full((3, 4), IGNORE)
    y[0, 1] = logits[0, 1].argmax()  # one answer, right
    correct, solved = per_step_scores(logits, y)
    assert correct.tolist() == [1.0, 0.0, 0.0] and solved.tolist() == [1.0, 0.0, 0.0]


def test_flops_per_token_of_the_decoder():
    """6 per weight of a matmul (the tied output layer counts; an embedding lookup, biases, norms and a
    learned position table do not) plus 12 x layers x width x sequence length."""
    spec = spec_of(16, 40, num_kv_pairs=2)
    D, V, L, T = 16, 40, 2, 16
    matmuls = L * (3 * D * D + D * D + 2 * 4 * D * D) + V * D  # per block: qkv, out, the MLP; then the head
    for positions in ("rope", "learned"):
        model = model_for("decoder", "mqar", spec, positions=positions, num_layers=2)
        assert matmul_params(model) == matmuls
        assert flops_per_token(model, T) == 6 * matmuls + 12 * L * D * T


# --- one short training per task x model -------------------------------------------------------------
TRAIN_SHAPES = {
    "mqar": ["--seq-len", "16", "--vocab-size", "16", "--num-kv-pairs", "2"],
    "induction": ["--seq-len", "8", "--vocab-size", "8"],
    "selective-copy": ["--seq-len", "12", "--vocab-size", "6", "--copy-len", "3"],
}
SEQ_LEN = {"mqar": 16, "induction": 8, "selective-copy": 12}
STEPS, BATCH = 4, 16
FAST_PAIRS = {("mqar", "decoder"), ("selective-copy", "lstm")}  # the fast tier trains these two


def model_args(model: str) -> list:
    args = ["--model", model, "--hidden-size", "16"]
    if model == "decoder":
        args += ["--num-heads", "2", "--positions", "rope"]
    if model == "transformer":
        args += ["--num-heads", "2"]
    return args


def short_train(task: str, model: str, run_dir: Path, capsys, *extra):
    argv = ["train", "--run-dir", run_dir, "--task", task, *TRAIN_SHAPES[task], *model_args(model),
            "--global-batch-size", BATCH, "--max-steps", STEPS, "--log-every", "2", "--eval-every", "2",
            "--eval-size", "32", "--no-progress", "--precision", "no", *extra]
    proc = run_main(argv, capsys)
    assert proc.returncode in (0, None), proc.stderr[-3000:]
    return proc


MATRIX = [pytest.param(task, model, marks=() if (task, model) in FAST_PAIRS else pytest.mark.slow,
                       id=f"{task}-{model}") for task in TOKEN_TASKS for model in MODEL_KINDS]


@pytest.mark.parametrize("task,model", MATRIX)
def test_short_training_writes_token_figures(task, model, run_dir, capsys):
    short_train(task, model, run_dir, capsys)
    result = summary(run_dir)
    T = SEQ_LEN[task]
    assert result["status"] == "complete" and result["step"] == STEPS and result["task"] == task
    assert math.isfinite(result["eval/loss"])
    assert result["tokens"] == STEPS * BATCH * T
    assert result["samples"] == STEPS * BATCH
    assert result["tokens_per_sec"] > 0
    assert result["tokens_per_sec"] == pytest.approx(result["samples_per_sec"] * T, rel=1e-9)
    assert result["model_flops_per_sec"] == pytest.approx(result["tokens_per_sec"] * result["flops_per_token"],
                                                          rel=1e-9)
    from distseq.inference.export import config_of

    cfg = config_of(json.loads((run_dir / "config.json").read_text()))
    fresh = build_model(cfg.model, TASKS[task], cfg.task_spec())
    assert result["flops_per_token"] == pytest.approx(flops_per_token(fresh, T), rel=1e-12)
    assert result["flops_per_token"] >= 6 * matmul_params(fresh) > 0
    assert result["mfu"] == "unknown" and result["peak_flops_per_device"] is None
    assert 0.0 <= result["eval/sequence_accuracy"] <= result["eval/accuracy"] <= 1.0
    if task == "induction":  # one answer per sample: a sample is solved exactly when its answer is right
        assert result["eval/sequence_accuracy"] == pytest.approx(result["eval/accuracy"], abs=1e-9)
    for entry in result["eval_history"]:
        assert entry["eval/sequence_accuracy"] <= entry["eval/accuracy"]
    tags = scalars(run_dir)
    for tag in ("perf/tokens_per_sec", "perf/model_flops_per_sec", "train/sequence_accuracy",
                "eval/sequence_accuracy", "train/accuracy", "train/loss"):
        assert [step for step, _ in tags[tag]] == [2, 4], tag
    assert "perf/mfu" not in tags  # the CPU has no known peak
    for (_, tps), (_, fps) in zip(tags["perf/tokens_per_sec"], tags["perf/model_flops_per_sec"]):
        assert tps > 0 and fps == pytest.approx(tps * result["flops_per_token"], rel=1e-5)  # float32 events
    assert all(math.isfinite(loss) for _, loss in tags["train/loss"])
    for (_, seq), (_, acc) in zip(tags["train/sequence_accuracy"], tags["train/accuracy"]):
        assert 0.0 <= seq <= acc + 1e-6


@pytest.mark.slow
def test_decoder_with_sinusoidal_positions_trains(run_dir, capsys):
    """--positions sinusoidal is the default: --model decoder without --positions must build."""
    argv = ["train", "--run-dir", run_dir, "--task", "induction", *TRAIN_SHAPES["induction"], "--model", "decoder",
            "--hidden-size", "16", "--num-heads", "2", "--global-batch-size", BATCH, "--max-steps", "2",
            "--eval-every", "0", "--eval-size", "32", "--no-progress", "--precision", "no"]
    proc = run_main(argv, capsys)
    assert proc.returncode in (0, None), proc.stderr[-3000:]
    assert summary(run_dir)["status"] == "complete"


@pytest.mark.slow
def test_tied_embeddings_train_save_and_resume(run_dir, capsys, tmp_path):
    """A tied decoder checkpoints (two names, one tensor), resumes, predicts and exports tied."""
    short_train("mqar", "decoder", run_dir, capsys, "--tie-embeddings", "--checkpoint-every", "2")
    assert summary(run_dir)["status"] == "complete"
    resumed = short_train("mqar", "decoder", run_dir, capsys, "--tie-embeddings", "--checkpoint-every", "2",
                          "--max-steps", "6")
    assert "resuming from" in resumed.stdout
    result = summary(run_dir)
    assert result["status"] == "complete" and result["step"] == 6 and result["tokens"] == 6 * BATCH * 16
    checkpoint = run_dir / "checkpoints" / "step-00000006"
    out = tmp_path / "export"
    assert run_main(["export", "--checkpoint", checkpoint, "--out", out], capsys).returncode in (0, None)
    from distseq.inference.export import load_model

    model = load_model(out)
    assert model.head.weight is model.embed.weight


# --- learning ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_decoder_learns_selective_copy(run_dir, capsys):
    """2 data tokens among 6 context steps, 4 possible tokens: chance is 1/4 per answer and 1/16 per
    sample. A tiny decoder gets (near) all of them in 250 steps (~10 s on a CPU core)."""
    argv = ["train", "--run-dir", run_dir, "--task", "selective-copy", "--seq-len", "8", "--vocab-size", "6",
            "--copy-len", "2", "--model", "decoder", "--positions", "rope", "--hidden-size", "32", "--num-heads", "2",
            "--num-layers", "2", "--global-batch-size", "64", "--max-steps", "250", "--lr", "3e-3",
            "--warmup-steps", "20", "--eval-every", "0", "--eval-size", "512", "--log-every", "50", "--no-progress",
            "--precision", "no", "--checkpoint-every", "0"]
    proc = run_main(argv, capsys)
    assert proc.returncode in (0, None), proc.stderr[-3000:]
    result = summary(run_dir)
    assert result["eval/accuracy"] > 0.9 and result["eval/sequence_accuracy"] > 0.8, result


# --- resume ------------------------------------------------------------------------------------------
def resume_args(run_dir: Path) -> list:
    return ["train", "--run-dir", str(run_dir), "--task", "mqar", *TRAIN_SHAPES["mqar"], *model_args("decoder"),
            "--global-batch-size", "16", "--max-steps", "6", "--checkpoint-every", "3", "--log-every", "3",
            "--eval-every", "0", "--eval-size", "32", "--no-progress", "--precision", "no"]


@pytest.mark.slow
def test_token_run_killed_and_resumed_matches_an_uninterrupted_one(tmp_path, capsys):
    """Killed half-way through writing step 6 (SIGKILL: step 3 is the newest intact checkpoint), then
    restarted: the same weights, byte for byte, and the same token count as a run never interrupted."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_main(resume_args(whole), capsys).returncode in (0, None)
    proc = subprocess.run([sys.executable, "-m", "distseq.cli", *resume_args(killed)], capture_output=True, text=True,
                          timeout=240, cwd=REPO, env=cpu_env(DISTSEQ_FAILPOINT="checkpoint-partial@6"))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-00000003"]
    resumed = run_main(resume_args(killed), capsys)
    assert resumed.returncode in (0, None), resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    a, b = summary(whole), summary(killed)
    assert a["tokens"] == b["tokens"] == 6 * 16 * 16
    assert b["status"] == "complete" and b["step"] == 6
    a, b = (checkpoint_weights(run / "checkpoints" / "step-00000006") for run in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- predict, export, eval, probe --------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_run(tmp_path_factory):
    """A finished decoder run on mqar (3 steps): a token-task checkpoint to read back."""
    run = tmp_path_factory.mktemp("token") / "run"
    argv = ["train", "--run-dir", str(run), "--task", "mqar", *TRAIN_SHAPES["mqar"], *model_args("decoder"),
            "--global-batch-size", "16", "--max-steps", "3", "--eval-every", "0", "--eval-size", "32",
            "--no-progress", "--precision", "no"]
    from distseq.cli import main

    try:
        main(argv)
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    return run


def test_predict_on_a_token_checkpoint(token_run, tmp_path, capsys):
    checkpoint = token_run / "checkpoints" / "step-00000003"
    proc = run_main(["predict", "--checkpoint", checkpoint, "--random", "3"], capsys)
    assert proc.returncode in (0, None), proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert len(row["classes"]) == 16 and all(0 <= c < 16 for c in row["classes"])
        assert len(row["label"]) == 16 and sum(v != IGNORE for v in row["label"]) == 2
    good = tmp_path / "in.jsonl"
    good.write_text(json.dumps({"sequence": list(range(16))}) + "\n")
    proc = run_main(["predict", "--checkpoint", checkpoint, "--input", good], capsys)
    assert proc.returncode in (0, None), proc.stderr
    assert len(json.loads(proc.stdout)["classes"]) == 16
    for sequence, message in [(list(range(3)), "sequence length 3, expected 16"),
                              (list(range(15)) + [16], "holds a token id outside [0, 16) (--vocab-size)"),
                              ([-1] + list(range(15)), "holds a token id outside [0, 16) (--vocab-size)"),
                              ([0.5] + list(range(15)), "must be a list of integer token ids"),
                              ([True] + list(range(15)), "must be a list of integer token ids")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"sequence": sequence}) + "\n")
        proc = run_main(["predict", "--checkpoint", checkpoint, "--input", bad], capsys)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1 and message in err, err


def test_export_and_eval_of_a_token_checkpoint(token_run, tmp_path, capsys):
    checkpoint = token_run / "checkpoints" / "step-00000003"
    out = tmp_path / "export"
    assert run_main(["export", "--checkpoint", checkpoint, "--out", out], capsys).returncode in (0, None)
    from distseq.inference.export import load_model, model_from_checkpoint

    exported = load_model(out)
    assert exported.distseq_config["data"]["task"] == "mqar"
    assert exported.distseq_config["data"]["num_kv_pairs"] == 2
    original, _, _ = model_from_checkpoint(checkpoint)
    x = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        assert torch.equal(exported(x), original(x))
    proc = run_main(["eval", "--run-dir", token_run, "--output", tmp_path / "e.json"], capsys)
    assert proc.returncode in (0, None), proc.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert 0 <= result["sequence_accuracy"] <= result["accuracy"] <= 1


@pytest.mark.parametrize("task", TOKEN_TASKS)
def test_precision_probe_takes_token_inputs(task):
    """The precision probe's example input is token ids, and every model kind runs on it."""
    from distseq.config import preset
    from distseq.training.precision import probe_table

    cfg = preset(task)
    cfg.data.seq_len = {"mqar": 32, "induction": 8, "selective-copy": 32}[task]
    cfg.model.hidden_size = 16
    cfg.train.global_batch_size = 2
    rows = probe_table(cfg, torch.device("cpu"), repeats=1)
    kinds = {r["model"] for r in rows}
    assert set(MODEL_KINDS) <= kinds
    for row in rows:
        if row["precision"] == "no":
            assert row["works"], row


@pytest.mark.slow
def test_cli_probe_on_a_token_preset(tmp_path, capsys):
    proc = run_main(["probe", "--preset", "induction", "--seq-len", "8", "--hidden-size", "16",
                     "--global-batch-size", "2", "--json", tmp_path / "p.json"], capsys)
    assert proc.returncode in (0, None), proc.stderr[-2000:]
    rows = json.loads((tmp_path / "p.json").read_text())
    assert {r["model"] for r in rows if r["precision"] == "no" and r["works"]} >= set(MODEL_KINDS)


def test_per_step_loss_and_scores_on_answers_only_equal_the_dense_form(monkeypatch):
    """On a CPU the per-step head looks only at the labelled steps; the dense form (what runs on an
    accelerator) gives the same losses, gradients and scores."""
    from distseq.tasks import heads as tasks

    torch.manual_seed(0)
    logits = torch.randn(20, 9, 7, requires_grad=True)
    y = torch.randint(0, 7, (20, 9))
    y[torch.rand(20, 9) < 0.7] = IGNORE
    y[3] = IGNORE  # a sample without answers
    y[4, 2] = logits[4, 2].argmax()  # and one with a right answer
    results = {}
    for form in ("answers", "dense"):
        if form == "dense":
            monkeypatch.setattr(tasks, "_answers", lambda y, device: None)
        loss = tasks.per_step_loss(logits, y)
        grad, = torch.autograd.grad(loss.sum(), logits)
        results[form] = (loss.detach(), grad, *tasks.per_step_scores(logits.detach(), y))
    (loss_a, grad_a, correct_a, solved_a), (loss_d, grad_d, correct_d, solved_d) = results.values()
    assert torch.allclose(loss_a, loss_d, atol=1e-6) and torch.allclose(grad_a, grad_d, atol=1e-7)
    assert torch.equal(correct_a, correct_d) and torch.equal(solved_a, solved_d)
    assert loss_a[3] == 0 and correct_a[3] == 0 and solved_a[3] == 0
    assert (grad_a[y == IGNORE] == 0).all()  # an unlabelled step gets no gradient


def test_mfu_peaks_by_gpu_name():
    """The first fragment found wins, so a name never falls to a shorter fragment it contains."""
    from distseq.models.flops import peak_flops, peak_for_name

    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe") == 756e12 and peak_for_name("NVIDIA H100 NVL") == 835e12
    assert peak_for_name("NVIDIA H200") == 989e12 and peak_for_name("NVIDIA GH200 480GB") == 989e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12 and peak_for_name("NVIDIA A10G") == 70e12
    assert peak_for_name("NVIDIA L40S") == 362e12 and peak_for_name("NVIDIA L40") == 181e12
    assert peak_for_name("NVIDIA L4") == 121e12
    assert peak_for_name("Tesla T4") is None and peak_for_name("") is None
    assert peak_flops(torch.device("cpu")) is None


def test_mfu_divides_model_flops_by_every_devices_peak():
    from distseq.training.metrics import Throughput, TrainingClock

    clock = TrainingClock()
    clock.begin_training()
    meter = Throughput(0, 0, 0, clock, flops_per_token=1e6, peak=1e12, devices=2)
    window = meter.window(1, 8, 8000)
    assert window["perf/mfu"] == pytest.approx(window["perf/model_flops_per_sec"] / 2e12)
    assert window["perf/model_flops_per_sec"] == pytest.approx(1e6 * window["perf/tokens_per_sec"])
