"""Token tasks: the recall, induction and copying probes sequence-model research runs.

Each is a pure, vectorised function of a seeded generator like every task (tasks.py), with ``x`` a
(n, T) int64 sequence of token ids in [0, --vocab-size) and a per-step head: ``y`` (n, T) holds the
answer at each answer position and IGNORE elsewhere, so the loss and the accuracy count answer
positions only; a sample is "solved" when every one of its answers is right.

- ``mqar``: multi-query associative recall (Arora et al. 2023, "Zoology", and its public code).
- ``induction``: one token A followed by a target B, A again at the end: predict B (Olsson et al. 2022).
- ``selective-copy``: tokens scattered among noise, copied in order after the context (Gu & Dao 2023,
  "Mamba", and its public code).
"""

from __future__ import annotations

import functools

import torch

from .errors import ConfigError
from .registry import TASKS
from .sampling import choose_distinct
from .tasks import IGNORE, Batch, Task, TaskSpec

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
    answer = torch.full((n, V), IGNORE, dtype=torch.int64).scatter_(1, keys, values)  # (n, V): key -> value
    y = answer.gather(1, x)  # (n, T)
    y[:, :2 * m] = IGNORE
    return y


@functools.lru_cache(maxsize=8)
def _gap_weights(slots: int) -> torch.Tensor:
    return torch.arange(1, slots + 1, dtype=torch.float64) ** (POWER_A - 1)  # (slots,)


def mqar(gen: torch.Generator, n: int, spec: TaskSpec) -> Batch:
    T, m, V = spec.seq_len, spec.num_kv_pairs, spec.vocab_size
    half = V // 2
    keys = 1 + choose_distinct(gen, n, m, half - 1)  # (n, m) in [1, V/2)
    values = half + choose_distinct(gen, n, m, V - half)  # (n, m) in [V/2, V)
    slots = (T - 2 * m) // 2
    gaps = choose_distinct(gen, n, m, slots, _gap_weights(slots))  # (n, m)
    x = _noise_without(gen, n, T, V, keys)  # (n, T)
    x[:, 0:2 * m:2] = keys
    x[:, 1:2 * m:2] = values
    queries = 2 * m + 2 * gaps  # (n, m) positions
    x.scatter_(1, queries, keys)
    y = torch.full((n, T), IGNORE, dtype=torch.int64).scatter_(1, queries, values)
    return {"x": x, "y": y}


def _noise_without(gen: torch.Generator, n: int, T: int, V: int, excluded: torch.Tensor) -> torch.Tensor:
    """(n, T) tokens uniform over [0, V) less each row's ``excluded`` (n, k) ids: rejection sampling,
    redrawing only the (rare) hits, so the result is exactly uniform over the allowed tokens."""
    x = torch.randint(0, V, (n, T), generator=gen)
    banned = torch.zeros(n, V, dtype=torch.bool).scatter_(1, excluded, True)  # (n, V)
    hits = banned.gather(1, x).nonzero()  # (h, 2) row, position
    while len(hits):
        redrawn = torch.randint(0, V, (len(hits),), generator=gen)
        x[hits[:, 0], hits[:, 1]] = redrawn
        hits = hits[banned[hits[:, 0], redrawn]]
    return x


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


# --- induction -----------------------------------------------------------------------------------
# x: noise, with token A at a random position p <= T - 3, the target B at p + 1, and A again at T - 1;
# A is uniform over the vocabulary and appears nowhere else; B and the noise are uniform over the
# other V - 1 tokens. y = B at position T - 1 (predict what followed A last time), IGNORE elsewhere.
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
    x = torch.randint(0, V - 1, (n, T), generator=gen)  # (n, T): then skip A, so uniform over the rest
    x += x >= trigger
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
    if d.vocab_size < 3:
        raise ConfigError("--vocab-size", f"selective-copy needs --vocab-size >= 3 (noise, marker and at least one "
                                          f"data token) (got {d.vocab_size})")


def _fixed_length(cfg, name: str) -> None:
    if cfg.data.min_seq_len not in (None, cfg.data.seq_len):
        raise ConfigError("--min-seq-len", f"the {name} task has a fixed length; leave --min-seq-len out")


def _vocab(spec: TaskSpec) -> int:
    return spec.vocab_size


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
}
for _name, _task in TOKEN_TASKS.items():
    TASKS.add(_name, _task)
