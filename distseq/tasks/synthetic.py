"""The built-in feature tasks: sum-sign (the original example), parity, the adding problem, copy memory.

Each is a pure, vectorised function of a seeded generator (see ``distseq.tasks.base``); ``x`` is
(n, T, F) float32 features. The copy task declares an option of its own, ``--copy-len``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from distseq.errors import ConfigError
from distseq.options import MAX_SEQ_LEN, option
from distseq.registry import TASKS, source_of
from distseq.tasks import Batch, Task, TaskSpec
from distseq.tasks.heads import IGNORE, REGRESSION_TOLERANCE


def _lengths(gen: torch.Generator, n: int, spec: TaskSpec) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-sample lengths (n,) and validity mask (n, T); both None for fixed-length samples."""
    if not spec.variable:
        return None, None
    lengths = torch.randint(spec.min_seq_len, spec.seq_len + 1, (n,), generator=gen)
    return lengths, torch.arange(spec.seq_len)[None, :] < lengths[:, None]


def _sample(x: torch.Tensor, y: torch.Tensor, lengths: Optional[torch.Tensor]) -> Batch:
    """A task's output; ``lengths`` only where they vary (fixed-length batches stay lean)."""
    return {"x": x, "y": y} if lengths is None else {"x": x, "y": y, "lengths": lengths}


# --- sum-sign: the original example ------------------------------------------------------------
def sum_sign_label(x: torch.Tensor, lengths: Optional[torch.Tensor], spec: TaskSpec) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(1).gt_(0)  # (n,) 1.0 / 0.0; padding is zero, so it adds nothing


def sum_sign(gen: torch.Generator, n: int, spec: TaskSpec) -> Batch:
    lengths, mask = _lengths(gen, n, spec)
    x = torch.randn(n, spec.seq_len, 1, generator=gen)  # (n, T, 1)
    if mask is not None:
        x *= mask[..., None]
    return _sample(x, sum_sign_label(x, lengths, spec), lengths)


# --- parity ------------------------------------------------------------------------------------
def parity_label(x: torch.Tensor, lengths: Optional[torch.Tensor], spec: TaskSpec) -> torch.Tensor:
    return (x.sum(dim=(1, 2)).round().to(torch.int64) % 2).to(torch.float32)  # (n,)


def parity(gen: torch.Generator, n: int, spec: TaskSpec) -> Batch:
    lengths, mask = _lengths(gen, n, spec)
    bits = torch.randint(0, 2, (n, spec.seq_len, 1), generator=gen).to(torch.float32)  # (n, T, 1)
    if mask is not None:
        bits *= mask[..., None]
    return _sample(bits, parity_label(bits, lengths, spec), lengths)


# --- adding problem (Hochreiter & Schmidhuber 1997) -------------------------------------------
def adding_label(x: torch.Tensor, lengths: Optional[torch.Tensor], spec: TaskSpec) -> torch.Tensor:
    return (x[..., 0] * x[..., 1]).sum(dim=1)  # (n,): sum of the two marked values


def adding(gen: torch.Generator, n: int, spec: TaskSpec) -> Batch:
    lengths, mask = _lengths(gen, n, spec)
    values = torch.rand(n, spec.seq_len, generator=gen)  # (n, T) ~ U[0, 1)
    if mask is not None:
        values *= mask
    length = lengths if lengths is not None else torch.full((n,), spec.seq_len, dtype=torch.int64)
    half = length // 2  # one mark in each half of the valid part
    u = torch.rand(n, 2, generator=gen)
    first = (u[:, 0] * half).to(torch.int64)  # (n,) in [0, half)
    second = half + (u[:, 1] * (length - half)).to(torch.int64)  # (n,) in [half, length)
    marks = torch.zeros(n, spec.seq_len)
    marks[torch.arange(n), first] = 1.0
    marks[torch.arange(n), second] = 1.0
    x = torch.stack([values, marks], dim=-1)  # (n, T, 2)
    return _sample(x, adding_label(x, lengths, spec), lengths)


# --- copy memory ---------------------------------------------------------------------------------
# Tokens: 0 blank, 1..V symbols, V+1 delimiter; x is their one-hot (n, T, V+2). The first copy_len
# steps hold symbols, step T-copy_len-1 the delimiter, and the last copy_len steps must output the
# symbols in order (classes 0..V-1); every other step is ignored by the loss.
def copy_label(x: torch.Tensor, lengths: Optional[torch.Tensor], spec: TaskSpec) -> torch.Tensor:
    n, T, S = x.shape[0], spec.seq_len, spec.copy_len
    y = torch.full((n, T), IGNORE, dtype=torch.int64)
    y[:, T - S :] = x[:, :S].argmax(dim=-1) - 1
    return y  # (n, T)


def copy(gen: torch.Generator, n: int, spec: TaskSpec) -> Batch:
    T, S, V = spec.seq_len, spec.copy_len, spec.vocab_size
    tokens = torch.zeros(n, T, dtype=torch.int64)
    tokens[:, :S] = torch.randint(1, V + 1, (n, S), generator=gen)
    tokens[:, T - S - 1] = V + 1
    x = F.one_hot(tokens, V + 2).to(torch.float32)  # (n, T, V+2)
    return _sample(x, copy_label(x, None, spec), None)


@dataclass
class CopyOptions:
    copy_len: int = option(5, "symbols the copy task must recall", low=1, high=MAX_SEQ_LEN)


def _adding_validate(cfg) -> None:
    d = cfg.data
    if d.seq_len < 2 or (d.min_seq_len is not None and d.min_seq_len < 2):
        flag = "--seq-len" if d.seq_len < 2 else "--min-seq-len"
        raise ConfigError(flag, "the adding task needs sequences of at least 2 steps (one mark in each half)")


def _copy_validate(cfg) -> None:
    d = cfg.data
    if d.seq_len < 2 * d.copy_len + 1:
        raise ConfigError("--seq-len", f"the copy task needs --seq-len >= 2 x --copy-len + 1 = {2 * d.copy_len + 1}")
    if d.min_seq_len not in (None, d.seq_len):
        raise ConfigError("--min-seq-len", "the copy task has a fixed length; leave --min-seq-len out")


BUILTIN_TASKS = {
    "sum-sign": Task(
        name="sum-sign",
        head="binary",
        label_rule="x_t ~ N(0, 1) i.i.d.; y = 1 if the sum of x over the sample's length is > 0, else 0",
        make=sum_sign,
        label=sum_sign_label,
        num_features=lambda spec: 1,
        num_outputs=lambda spec: 1,
    ),
    "parity": Task(
        name="parity",
        head="binary",
        label_rule="x_t uniform in {0, 1}; y = (number of ones within the sample's length) mod 2",
        make=parity,
        label=parity_label,
        num_features=lambda spec: 1,
        num_outputs=lambda spec: 1,
    ),
    "adding": Task(
        name="adding",
        head="regression",
        label_rule="x_t = (value ~ U[0, 1), mark); one mark in each half of the length; y = sum of the two "
        f"marked values (MSE; 'accuracy' = |error| < {REGRESSION_TOLERANCE})",
        make=adding,
        label=adding_label,
        num_features=lambda spec: 2,
        num_outputs=lambda spec: 1,
        validate=_adding_validate,
    ),
    "copy": Task(
        name="copy",
        head="per-step",
        label_rule="copy_len symbols from 1..V, blanks, a delimiter at T-copy_len-1; the last copy_len steps "
        "must output the symbols in order (cross-entropy on those steps; accuracy per symbol)",
        make=copy,
        label=copy_label,
        num_features=lambda spec: spec.vocab_size + 2,
        num_outputs=lambda spec: spec.vocab_size,
        validate=_copy_validate,
    ),
}
for _name, _task in BUILTIN_TASKS.items():
    TASKS.add(_name, _task, CopyOptions if _name == "copy" else None, source=source_of(_task.make))
