"""Token tasks: the recall, induction and copying probes sequence-model research runs.

Each is a pure, vectorised function of a seeded generator like every task (tasks.py), with ``x`` a
(n, T) int64 sequence of token ids in [0, --vocab-size) and a per-step head: ``y`` (n, T) holds the
answer at each answer position and IGNORE elsewhere, so the loss and the accuracy count answer
positions only; a sample is "solved" when every one of its answers is right.

- ``mqar``: multi-query associative recall (Arora et al. 2023, "Zoology", and its public code).
- ``induction``: one token A followed by a target B, A again at the end: predict B (Olsson et al. 2022).
- ``selective-copy``: tokens scattered among noise, copied in order after the context (Gu & Dao 2023,
  "Mamba", and its public code).
- ``lm``: causal language modelling on the user's own tokens (``--data-files``), every position labelled.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import torch

from distseq.errors import ConfigError
from distseq.options import MAX_SEQ_LEN, option
from distseq.registry import TASKS, source_of
from distseq.tasks import Batch, Task, TaskSpec
from distseq.tasks.heads import IGNORE
from distseq.tasks.sampling import RACE_FACTOR, choose_distinct, draws_needed, small_int

MQAR_MAX_VOCAB = 65536  # per-row tables over the vocabulary stay small (Zoology's MQAR uses 8,192)
POWER_A = 0.01  # Zoology's power law of query gaps: P(gap = g) ~ (g + 1) ** (POWER_A - 1)


# --- mqar ----------------------------------------------------------------------------------------
# x: k_1 v_1 k_2 v_2 ... k_m v_m, then noise with each key once more at position 2m + 2 g_j (query j);
# y = v_j at query j's position (the next token a language model predicts there), IGNORE elsewhere.
# Keys are distinct, from [1, V/2); values distinct, from [V/2, V); gaps g_j distinct, drawn without
# replacement with P(g) ~ (g + 1) ** (a - 1) over (T - 2m) // 2 slots, as Zoology draws them. Noise is
# uniform over the vocabulary less the sample's own keys, so every key after the pairs is a query
# (Zoology's noise may also repeat a key, unlabelled, with probability m / V per position).
def mqar_label(x: torch.Tensor, lengths, spec: TaskSpec) -> torch.Tensor:
    n, m, V = x.shape[0], spec.num_kv_pairs, spec.vocab_size
    keys, values = x[:, 0:2 * m:2], x[:, 1:2 * m:2]  # (n, m) each
    y = torch.empty_like(x)
    step = _rows_per_table(n, V * 8)
    for a in range(0, n, step):  # a bounded (rows, V) table at a time: key -> value
        answer = torch.full((min(step, n - a), V), IGNORE, dtype=torch.int64)
        answer.scatter_(1, keys[a:a + step], values[a:a + step])
        torch.gather(answer, 1, x[a:a + step], out=y[a:a + step])
    y[:, :2 * m] = IGNORE
    return y


@functools.lru_cache(maxsize=8)
def _gap_weights(slots: int) -> torch.Tensor:
    return torch.arange(1, slots + 1, dtype=torch.float64) ** (POWER_A - 1)  # (slots,)


def mqar(gen: torch.Generator, n: int, spec: TaskSpec) -> Batch:
    T, m, V = spec.seq_len, spec.num_kv_pairs, spec.vocab_size
    slots = (T - 2 * m) // 2
    gaps = choose_distinct(gen, n, m, slots, _gap_weights(slots))  # (n, m)
    x = torch.empty(n, T, dtype=torch.int64)
    keys, values = _pairs_and_noise(gen, x, m, V)  # (n, m) each; x[:, 2m:] = noise without the keys
    x[:, :2 * m].view(n, m, 2).copy_(torch.stack([keys, values], 2))  # k1 v1 k2 v2 ...
    queries = 2 * m + 2 * gaps  # (n, m) positions
    x.scatter_(1, queries, keys)
    y = torch.full((n, T), IGNORE, dtype=torch.int64).scatter_(1, queries, values)
    return {"x": x, "y": y}


def _pairs_and_noise(gen: torch.Generator, x: torch.Tensor, m: int, V: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys (n, m) distinct uniform from [1, V/2), values (n, m) distinct uniform from [V/2, V), each in
    successive-sampling order, and x[:, 2m:] filled with noise uniform over [0, V) less the row's keys.

    One per-row table over the vocabulary serves both steps: the first distinct values of i.i.d. draws
    (as ``choose_distinct`` takes them) are found in it, and it then marks the keys the noise must avoid."""
    n, T = x.shape
    half = V // 2
    count, _ = draws_needed(m, half - 1, None)  # i.i.d. draws per row for each of keys and values
    if half - 1 <= RACE_FACTOR * m:  # keys dense in their range: the general way
        keys = 1 + choose_distinct(gen, n, m, half - 1)
        values = half + choose_distinct(gen, n, m, V - half)
        _noise_without(gen, x, 2 * m, V, keys)
        return keys, values
    candidates = torch.empty(n, 2, count, dtype=torch.int64)
    candidates[:, 0].random_(1, half, generator=gen)  # keys' draws
    candidates[:, 1].random_(half, V, generator=gen)  # values' draws
    dtype = small_int(count)
    top = torch.iinfo(dtype).max
    marks = torch.arange(top, top - count, -1, dtype=dtype).repeat(2)  # (2c,): earlier draw, larger mark
    keys = torch.empty(n, m, dtype=torch.int64)
    values = torch.empty(n, m, dtype=torch.int64)
    step = _rows_per_table(n, V * marks.element_size())
    table = torch.zeros(step, V, dtype=dtype)
    for a in range(0, n, step):
        b = min(a + step, n)
        rows = table[:b - a]
        drawn = candidates[a:b].view(b - a, 2 * count)
        rows.scatter_reduce_(1, drawn, marks.expand(b - a, -1), reduce="amax")  # each value: its first draw's mark
        first = (rows.gather(1, drawn) == marks).view(b - a, 2, count)  # the first draw of its value
        rank = first.cumsum(2, dtype=torch.int32)
        enough = (rank[:, :, -1] >= m).all(1)  # (rows,)
        keep = first & (rank <= m)
        surplus = (first & (rank > m)).view(b - a, -1)  # distinct draws after the m-th: unmark them
        index = rank[:, 0] - 1  # (rows, c): key j's first draw, at column col, is marked top - col
        if bool(enough.all()):
            pair = drawn.masked_select(keep.view(b - a, -1)).view(b - a, 2, m)
            keys[a:b], values[a:b] = pair[:, 0], pair[:, 1]
        else:  # rare: a row short of m distinct keys or values draws both afresh. Exact: uniform draws
            # kept when not short are still uniform (the event only depends on which draws are equal)
            done = enough.nonzero().squeeze(1)
            short = (~enough).nonzero().squeeze(1)
            kept = keep.index_select(0, done).view(len(done), 2 * count)
            pair = drawn.index_select(0, done).masked_select(kept).view(len(done), 2, m)
            keys[a + done], values[a + done] = pair[:, 0], pair[:, 1]
            keys[a + short] = 1 + choose_distinct(gen, len(short), m, half - 1)
            values[a + short] = half + choose_distinct(gen, len(short), m, V - half)
            surplus[short] = False
            rows.index_fill_(0, short, 0)  # then key j is marked top - j (values need no mark)
            rows[short] = rows[short].scatter_(1, keys[a + short], marks[:m].expand(len(short), -1))
            index[short, :m] = torch.arange(m, dtype=index.dtype)
        offsets = torch.arange(0, (b - a) * V, V).unsqueeze(1)
        rows.view(-1).index_fill_(0, drawn.add(offsets).masked_select(surplus), 0)
        _noise_rows(gen, x, a, b, 2 * m, V - m, rows, top, index, half)
        if b < n:  # clean the table for the next rows: every mark sits on a draw or a key
            rows.scatter_(1, drawn, 0).scatter_(1, keys[a:b], 0)
    return keys, values


# per-row lookup tables are built for at most this many bytes of rows at a time. The noise is drawn
# a table's rows at a time, so this is part of a wide-vocabulary sample's identity: keep it fixed
TABLE_BYTES = 16 << 20


def _rows_per_table(n: int, row_bytes: int) -> int:
    return max(1, min(n, TABLE_BYTES // row_bytes))


def _noise_rows(gen: torch.Generator, x: torch.Tensor, a: int, b: int, start: int, allowed: int,
                table: torch.Tensor, top: int, index: torch.Tensor, half: int) -> None:
    """x[a:b, start:]: uniform over [0, allowed), then a draw that is key j of its row becomes
    allowed + j. ``table`` marks a row's keys (all below ``half``) with top - col, and ``index[row, col]``
    is that key's j; a mark on a token from ``half`` up is no key."""
    T = x.shape[1]
    length = T - start
    noise = x[a:b, start:]
    noise.random_(0, allowed, generator=gen)
    hit = table.gather(1, noise)  # (rows, length): the mark of each draw's token
    where = sparse_nonzero(hit)  # flat positions in hit
    if len(where):
        flat = x.view(-1)
        row = where.div(length, rounding_mode="floor")
        at = row.mul(T).add_(where.remainder(length)).add_(a * T + start)
        key = flat.index_select(0, at) < half
        row, at = row[key], at[key]
        column = hit.view(-1).index_select(0, where[key]).to(torch.int64).neg_().add_(top)
        j = index.view(-1).index_select(0, row.mul_(index.shape[1]).add_(column))
        flat.index_put_((at,), j.to(torch.int64).add_(allowed))


def _noise_without(gen: torch.Generator, x: torch.Tensor, start: int, V: int, excluded: torch.Tensor) -> None:
    """Fill ``x[:, start:]`` ((n, T) contiguous) with tokens uniform over [0, V) less each row's ``excluded``
    (n, k) ids (distinct, all below V - k). A draw u uniform over [0, V - k) is kept unless it is an
    excluded id, the j-th of its row, which becomes V - k + j: a bijection onto the allowed tokens, so
    exactly uniform with no rejection. Hits are read from a per-row table of the excluded ids (j + 1,
    0 elsewhere), built for a bounded number of rows at a time."""
    n, T = x.shape
    k = excluded.shape[1]
    allowed, length = V - k, T - start
    noise = x[:, start:]
    noise.random_(0, allowed, generator=gen)
    dtype = small_int(k)
    index = torch.arange(1, k + 1, dtype=dtype).expand(n, k)  # j + 1
    step = _rows_per_table(n, allowed * index.element_size())
    table = torch.zeros(step, allowed, dtype=dtype)
    flat = x.view(-1)
    for a in range(0, n, step):
        b = min(a + step, n)
        rows, ids = table[:b - a], excluded[a:b]
        rows.scatter_(1, ids, index[a:b])
        hit = rows.gather(1, noise[a:b])  # (rows, length): j + 1 where the draw is the row's j-th excluded id
        where = sparse_nonzero(hit)  # flat positions in hit
        if len(where):
            row, column = where.div(length, rounding_mode="floor"), where.remainder(length)
            flat.index_put_(((a + row) * T + start + column,),
                            hit.view(-1).index_select(0, where).to(torch.int64).add_(allowed - 1))
        if b < n:
            rows.scatter_(1, ids, 0)  # clean for the next rows


def sparse_nonzero(t: torch.Tensor) -> torch.Tensor:
    """The flat indices of the non-zero entries of a contiguous integer tensor that is mostly zeros:
    eight bytes at a time first (one int64 word), then the entries of the words that are not zero."""
    flat = t.view(-1)
    per_word = 8 // flat.element_size()
    main = flat.numel() // per_word * per_word
    w = (flat[:main].view(torch.int64) != 0).nonzero().squeeze(1)  # (h,) words holding a non-zero entry
    sub = flat[:main].view(-1, per_word).index_select(0, w).nonzero()  # (h', 2) word, entry
    found = w.index_select(0, sub[:, 0]).mul_(per_word).add_(sub[:, 1])
    if main < flat.numel():
        found = torch.cat([found, flat[main:].nonzero().squeeze(1).add_(main)])
    return found


def _mqar_validate(cfg) -> None:
    d = cfg.data
    m, V, T = d.num_kv_pairs, d.vocab_size, d.seq_len
    _fixed_length(cfg, "mqar")
    if 4 * m > T:
        raise ConfigError("--seq-len", f"mqar needs --seq-len >= 4 x --num-kv-pairs = {4 * m} (the pairs, then a "
                                       f"query slot per pair) (got {T})")
    if m > V // 2 - 1:
        raise ConfigError("--vocab-size", f"mqar draws {m} distinct keys from [1, vocab/2): --vocab-size must be at "
                                          f"least {2 * m + 2} for --num-kv-pairs {m} (got {V})")
    if V > MQAR_MAX_VOCAB:
        raise ConfigError("--vocab-size", f"mqar supports --vocab-size up to {MQAR_MAX_VOCAB} (its samples are "
                                          f"drawn with per-row tables over the vocabulary) (got {V})")


# --- induction -----------------------------------------------------------------------------------
# x: noise, with token A at a random position p <= T - 3, the target B at p + 1, and A again at T - 1;
# A is uniform over the vocabulary and appears nowhere else; B and the noise are uniform over the
# other V - 1 tokens (drawn over [0, V - 1), then A, where drawn, becomes V - 1: a bijection). y = B at
# position T - 1 (predict what followed A last time), IGNORE elsewhere.
def induction_label(x: torch.Tensor, lengths, spec: TaskSpec) -> torch.Tensor:
    n, T = x.shape
    trigger = x[:, -1:]  # (n, 1)
    first = (x[:, :-1] == trigger).to(torch.int8).argmax(1)  # (n,) A's first position
    y = torch.full((n, T), IGNORE, dtype=torch.int64)
    y[:, -1] = x[torch.arange(n), first + 1]
    return y


def induction(gen: torch.Generator, n: int, spec: TaskSpec) -> Batch:
    T, V = spec.seq_len, spec.vocab_size
    trigger = torch.randint(0, V, (n, 1), generator=gen)  # (n, 1)
    x = torch.randint(0, V - 1, (n, T), generator=gen)  # (n, T): uniform over [0, V - 1) ...
    hits = sparse_nonzero((x == trigger).view(torch.int8))  # ... then A -> V - 1: a bijection onto the rest
    if len(hits):
        x.view(-1).index_fill_(0, hits, V - 1)
    at = torch.randint(0, T - 2, (n,), generator=gen)  # (n,) A's first position
    rows = torch.arange(n)
    x[rows, at] = trigger[:, 0]
    x[:, -1] = trigger[:, 0]
    y = torch.full((n, T), IGNORE, dtype=torch.int64)
    y[:, -1] = x[rows, at + 1]
    return {"x": x, "y": y}


def _induction_validate(cfg) -> None:
    _fixed_length(cfg, "induction")
    if cfg.data.seq_len < 3:
        raise ConfigError("--seq-len", f"induction needs --seq-len >= 3 (A, B, then A again) (got {cfg.data.seq_len})")
    if cfg.data.vocab_size < 3:
        raise ConfigError("--vocab-size", f"induction needs --vocab-size >= 3 (got {cfg.data.vocab_size})")


# --- selective copying ---------------------------------------------------------------------------
# Tokens: 0 noise, 1..V-2 data, V-1 marker. x: a context of T - c positions holding c data tokens at
# distinct random positions (uniform, in increasing order) and noise elsewhere, then c markers;
# y at the i-th marker = the i-th data token of the context, IGNORE elsewhere (c = --copy-len).
def selective_copy_label(x: torch.Tensor, lengths, spec: TaskSpec) -> torch.Tensor:
    n, T, c = x.shape[0], spec.seq_len, spec.copy_len
    context = x[:, :T - c]
    y = torch.full((n, T), IGNORE, dtype=torch.int64)
    y[:, T - c:] = context[context != 0].view(n, c)  # row-major: each row's data tokens in order
    return y


def selective_copy(gen: torch.Generator, n: int, spec: TaskSpec) -> Batch:
    T, c, V = spec.seq_len, spec.copy_len, spec.vocab_size
    data = torch.randint(1, V - 1, (n, c), generator=gen)  # (n, c)
    where = choose_distinct(gen, n, c, T - c).sort(dim=1).values  # (n, c) increasing positions
    x = torch.zeros(n, T, dtype=torch.int64)
    x.scatter_(1, where, data)
    x[:, T - c:] = V - 1
    y = torch.full((n, T), IGNORE, dtype=torch.int64)
    y[:, T - c:] = data
    return {"x": x, "y": y}


def _selective_copy_validate(cfg) -> None:
    d = cfg.data
    _fixed_length(cfg, "selective-copy")
    if d.seq_len < 2 * d.copy_len:
        raise ConfigError("--seq-len", f"selective-copy needs --seq-len >= 2 x --copy-len = {2 * d.copy_len} "
                                       f"(a context that holds them, then a marker each) (got {d.seq_len})")
    if d.vocab_size < 4:  # with one data token every answer is that token: one possible label, nothing to learn
        raise ConfigError("--vocab-size", f"selective-copy needs --vocab-size >= 4 (noise, marker and at least two "
                                          f"data tokens: with one, every answer is the same token) "
                                          f"(got {d.vocab_size})")


# --- lm -----------------------------------------------------------------------------------------
# Causal language modelling on the user's tokens: a window of T + 1 tokens, x its first T, y the next token
# at every position. The windows come from --data-files (data/tokens.py); ``make`` draws uniform tokens in the
# same shape, which is what the task contract, benchmarks and check-task see without files.
def language_model(gen: torch.Generator, n: int, spec: TaskSpec) -> Batch:
    window = torch.randint(0, spec.vocab_size, (n, spec.seq_len + 1), generator=gen)  # (n, T + 1)
    return {"x": window[:, :-1].contiguous(), "y": window[:, 1:].contiguous()}


def _lm_validate(cfg) -> None:
    d = cfg.data
    _fixed_length(cfg, "lm")
    if not d.data_files:
        raise ConfigError("--data-files", "--task lm learns your tokens: give token files (.bin, .parquet, .jsonl) "
                                          "or text files (.txt)")
    if d.data_streaming:
        raise ConfigError("--data-streaming", "--task lm reads its tokens through their index (windows across "
                                              "documents); leave it out")


def _fixed_length(cfg, name: str) -> None:
    if cfg.data.min_seq_len not in (None, cfg.data.seq_len):
        raise ConfigError("--min-seq-len", f"the {name} task has a fixed length; leave --min-seq-len out")


def _vocab(spec: TaskSpec) -> int:
    return spec.vocab_size


@dataclass
class MqarOptions:
    num_kv_pairs: int = option(8, "key-value pairs per mqar sample (each queried once)", low=1, high=MAX_SEQ_LEN)


@dataclass
class SelectiveCopyOptions:
    copy_len: int = option(5, "tokens the selective-copy task must recall", low=1, high=MAX_SEQ_LEN)


OPTIONS = {"mqar": MqarOptions, "selective-copy": SelectiveCopyOptions}
TOKEN_TASKS = {
    "mqar": Task(
        name="mqar", head="per-step",
        label_rule="k1 v1 ... km vm (distinct keys from [1, V/2), distinct values from [V/2, V)), then noise "
        "(uniform over the tokens that are not the sample's keys) with key j again at 2m + 2 g_j, g_j distinct with "
        f"P(g) ~ (g + 1)^({POWER_A} - 1); y = v_j at key j's second position, IGNORE elsewhere (Zoology's MQAR)",
        make=mqar, label=mqar_label, num_features=lambda spec: 1, num_outputs=_vocab, validate=_mqar_validate,
        vocab=_vocab,
    ),
    "induction": Task(
        name="induction", head="per-step",
        label_rule="noise over V - 1 tokens; the remaining token A at a random position p <= T - 3 and at T - 1, a "
        "target B (not A) at p + 1; y = B at position T - 1, IGNORE elsewhere",
        make=induction, label=induction_label, num_features=lambda spec: 1, num_outputs=_vocab,
        validate=_induction_validate, vocab=_vocab,
    ),
    "selective-copy": Task(
        name="selective-copy", head="per-step",
        label_rule="copy_len data tokens from 1..V-2 at distinct random positions of the first T - copy_len steps "
        "(noise 0 elsewhere), then copy_len markers V-1; y = the data tokens in order at the markers, IGNORE elsewhere",
        make=selective_copy, label=selective_copy_label, num_features=lambda spec: 1, num_outputs=_vocab,
        validate=_selective_copy_validate, vocab=_vocab,
    ),
    "lm": Task(
        name="lm", head="per-step",
        label_rule="a window of T + 1 tokens of --data-files (documents packed, or cut within each, by --packing); "
        "x = its first T, y = the next token at every position (IGNORE past the end of a short window)",
        make=language_model, label=None, num_features=lambda spec: 1, num_outputs=_vocab, validate=_lm_validate,
        vocab=_vocab, language_model=True,
    ),
}
for _name, _task in TOKEN_TASKS.items():
    TASKS.add(_name, _task, OPTIONS.get(_name), source=source_of(_task.make))
