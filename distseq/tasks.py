"""Synthetic tasks: each is a pure, vectorised function of a seeded generator.

``make(gen, n, spec)`` draws ``n`` samples at once and returns ``{"x": (n, T, F) float32, "y": ...}``
plus ``"lengths": (n,) int64`` when lengths vary; a token task (``vocab`` set) returns ``x`` as
``(n, T) int64`` token ids in ``[0, vocab(spec))`` instead. The stream (data.py) seeds the generator from
(seed, split, block), so a task never sees sample indices and never loops over samples: sample i is a
pure function of (seed, block, position in the block). Positions at or beyond a sample's length are
zero in ``x`` and never influence its label. The ``head`` picks the loss, the metric and the shape
of ``y``: binary and regression (n,) float32, classes (n,) int64, per-step (n, T) int64 with
``IGNORE`` where a step carries no label. Tasks are registered by name (registry.py); the built-ins
below register the same way a user's task does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .registry import TASKS

Batch = Dict[str, torch.Tensor]
IGNORE = -100  # target of a position that carries no label (CrossEntropyLoss's ignore_index)
ADDING_TOLERANCE = 0.04  # an adding-problem prediction counts as correct within this distance


@dataclass(frozen=True)
class TaskSpec:
    """The shape parameters that, with the task, define what one sample is."""

    seq_len: int  # T, the padded length of every sample
    min_seq_len: int  # lengths are uniform in [min_seq_len, seq_len]; equal = fixed length
    vocab_size: int = 8  # symbols of the copy task; tokens of the token tasks
    copy_len: int = 5  # symbols the copy tasks ask the model to recall
    num_kv_pairs: int = 8  # key-value pairs of one mqar sample

    @property
    def variable(self) -> bool:
        return self.min_seq_len < self.seq_len


@dataclass(frozen=True)
class Task:
    name: str
    head: str  # "binary" | "classes" | "regression" | "per-step": which loss, metric and y shape apply
    label_rule: str  # the documented definition of y, checked by the tests
    make: Callable[[torch.Generator, int, TaskSpec], Batch]
    label: Optional[Callable[[torch.Tensor, Optional[torch.Tensor], TaskSpec], torch.Tensor]]  # y from (x, lengths)
    num_features: Callable[[TaskSpec], int]  # F
    num_outputs: Callable[[TaskSpec], int]  # logits per sample (per step for "per-step"); classes for "classes"
    validate: Optional[Callable[[Any], None]] = None  # checks a TrainConfig; raises ConfigError
    vocab: Optional[Callable[[TaskSpec], int]] = None  # token tasks: x holds ids in [0, vocab(spec)); None: features

    @property
    def tokens(self) -> bool:
        """Whether x holds token ids (n, T) int64 rather than features (n, T, F) float32."""
        return self.vocab is not None

    def input_bytes(self, spec: TaskSpec) -> int:
        """Bytes of one time step of x."""
        return 8 if self.tokens else 4 * self.num_features(spec)

    def example_input(self, n: int, spec: TaskSpec, device=None) -> torch.Tensor:
        """Random inputs of the right kind and shape: (n, T) ids or (n, T, F) features."""
        if self.tokens:
            return torch.randint(0, self.vocab(spec), (n, spec.seq_len), device=device)
        return torch.randn(n, spec.seq_len, self.num_features(spec), device=device)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return HEADS[self.head][0](logits, y)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return HEADS[self.head][1](logits, y)

    def scores(self, logits: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(correct, solved), each (B,): ``correct`` as above; ``solved`` 1.0 where every labelled step
        of a sample is right (per-step heads; one argmax serves both), else the same as ``correct``."""
        if self.head == "per-step":
            return per_step_scores(logits, y)
        correct = self.correct(logits, y)
        return correct, correct


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


def register_task(name: str):
    """Class (or instance) decorator: make a synthetic task available as ``--task NAME``.

    The object declares ``head`` ("binary", "classes", "regression" or "per-step"),
    ``num_features(spec)``, ``num_outputs(spec)`` and ``make(generator, n, spec)``: a vectorised
    function of a seeded ``torch.Generator`` returning ``{"x": (n, T, F) float32, "y": ...}`` (plus
    ``"lengths"`` (n,) int64 when they vary). A token task declares ``vocab(spec)`` instead of
    ``num_features`` and returns ``x`` as (n, T) int64 ids in [0, vocab). Optional: ``label(x,
    lengths, spec)`` (y recomputed from the inputs, which ``distseq check-task`` verifies),
    ``validate(cfg)`` (raise ConfigError) and ``label_rule`` (else the docstring)."""

    def register(obj):
        TASKS.add(name, as_task(name, obj() if isinstance(obj, type) else obj))
        return obj

    return register


def as_task(name: str, obj) -> Task:
    """A registered task: a Task, or any object with head, num_features, num_outputs and make."""
    if isinstance(obj, Task):
        task = replace(obj, name=name)
    else:
        vocab = getattr(obj, "vocab", None)
        needed = ("head", "num_outputs", "make") + (() if vocab is not None else ("num_features",))
        missing = [a for a in needed if not hasattr(obj, a)]
        if missing:
            raise TypeError(f"task {name!r} lacks {', '.join(missing)} (see distseq.tasks.Task)")
        task = Task(name=name, head=obj.head, label_rule=getattr(obj, "label_rule", "") or (obj.__doc__ or "").strip(),
                    make=obj.make, label=getattr(obj, "label", None),
                    num_features=getattr(obj, "num_features", None) or (lambda spec: 1),
                    num_outputs=obj.num_outputs, validate=getattr(obj, "validate", None), vocab=vocab)
    if task.head not in HEADS:
        raise TypeError(f"task {name!r} has head {task.head!r}; choose from {', '.join(HEADS)}")
    return task


def _adding_validate(cfg) -> None:
    d = cfg.data
    if d.seq_len < 2 or (d.min_seq_len is not None and d.min_seq_len < 2):
        option = "--seq-len" if d.seq_len < 2 else "--min-seq-len"
        raise ConfigError(option, "the adding task needs sequences of at least 2 steps (one mark in each half)")


def _copy_validate(cfg) -> None:
    d = cfg.data
    if d.seq_len < 2 * d.copy_len + 1:
        raise ConfigError("--seq-len", f"the copy task needs --seq-len >= 2 x --copy-len + 1 = {2 * d.copy_len + 1}")
    if d.min_seq_len not in (None, d.seq_len):
        raise ConfigError("--min-seq-len", "the copy task has a fixed length; leave --min-seq-len out")


# --- heads: loss and metric per sample ---------------------------------------------------------
def binary_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Logits, not probabilities: BCE-with-logits is the form that stays exact under autocast.
    return F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")  # (B,)


def binary_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((logits > 0).to(torch.float32) == y).to(torch.float32)  # (B,)


def regression_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred.float() - y) ** 2  # (B,)


def regression_correct(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred.float() - y).abs() < ADDING_TOLERANCE).to(torch.float32)  # (B,)


def classes_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")  # logits (B, C), y (B,) -> (B,)


def classes_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == y).to(torch.float32)  # (B,)


# Per-step heads label few steps (an answer here and there among noise). On a CPU the loss and the
# scores look at the labelled steps only: a softmax and an argmax over every step's logits cost a
# per-step harness ~10% of a small decoder's step, and finding the labelled steps (a nonzero) costs
# nothing there. On an accelerator that nonzero would wait for the device each step, so the dense form
# runs there (the same numbers, summed in another order).
def _answers(y: torch.Tensor, device: torch.device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(sample, step) of every labelled step, or None where the dense form is cheaper."""
    return (y != IGNORE).nonzero(as_tuple=True) if device.type == "cpu" else None


def per_step_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each sample's labelled steps: logits (B, T, C), y (B, T) -> (B,)."""
    B, T, C = logits.shape
    count = (y != IGNORE).sum(1).clamp(min=1).to(torch.float32)  # (B,)
    answers = _answers(y, logits.device)
    if answers is not None:
        per_answer = F.cross_entropy(logits[answers].float(), y[answers], reduction="none")  # (A,)
        return torch.zeros(B, device=logits.device).index_add(0, answers[0], per_answer) / count
    per_step = F.cross_entropy(logits.float().reshape(B * T, C), y.reshape(B * T), ignore_index=IGNORE,
                               reduction="none").view(B, T)  # softmax over the contiguous last dimension
    return per_step.sum(1) / count  # ignored steps are 0


def per_step_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of each sample's labelled steps predicted right: (B,)."""
    return per_step_scores(logits, y)[0]


def per_step_scores(logits: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fraction of each sample's labelled steps right, 1.0 where all of them are), each (B,)."""
    count = (y != IGNORE).sum(1)  # (B,)
    answers = _answers(y, logits.device)
    if answers is not None:
        wrong_answers = (logits[answers].argmax(-1) != y[answers]).to(count.dtype)  # (A,)
        wrong = torch.zeros_like(count).index_add(0, answers[0], wrong_answers)
    else:
        wrong = ((logits.argmax(-1) != y) & (y != IGNORE)).sum(1)
    correct = (count - wrong).to(torch.float32) / count.clamp(min=1).to(torch.float32)
    return correct, ((wrong == 0) & (count > 0)).to(torch.float32)  # no answers: neither right nor solved


HEADS = {
    "binary": (binary_loss, binary_correct),
    "classes": (classes_loss, classes_correct),
    "regression": (regression_loss, regression_correct),
    "per-step": (per_step_loss, per_step_correct),
}

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
        f"marked values (MSE; 'accuracy' = |error| < {ADDING_TOLERANCE})",
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
    TASKS.add(_name, _task)
