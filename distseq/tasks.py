"""Synthetic tasks: each is a pure, vectorised function of a seeded generator.

``make(gen, n, seq_len)`` draws ``n`` samples at once and returns ``{"x": (n, T, F) float32,
"y": (n,) float32}``. The stream (data.py) decides which generator state a block of samples comes
from, so a task never sees sample indices and never loops over samples. Adding a task is one
function plus one ``Task`` entry in ``TASKS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F

Batch = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Task:
    name: str
    num_features: int  # F: features per time step of x
    num_outputs: int  # logits the model emits per sample
    label_rule: str  # the documented definition of y, checked by the tests
    make: Callable[[torch.Generator, int, int], Batch]
    label: Callable[[torch.Tensor], torch.Tensor]  # y recomputed from x alone
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-sample loss (B,)
    correct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> 1.0 where right (B,)


def binary_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Logits, not probabilities: BCE-with-logits is the form that stays exact under autocast.
    return F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")  # (B,)


def binary_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((logits > 0).to(torch.float32) == y).to(torch.float32)  # (B,)


def sum_sign_label(x: torch.Tensor) -> torch.Tensor:
    return (x.sum(dim=(1, 2)) > 0).to(torch.float32)  # (n,)


def sum_sign(gen: torch.Generator, n: int, seq_len: int) -> Batch:
    x = torch.randn(n, seq_len, 1, generator=gen)  # (n, T, 1) ~ N(0, 1)
    return {"x": x, "y": sum_sign_label(x)}


TASKS: Dict[str, Task] = {
    "sum-sign": Task(
        name="sum-sign",
        num_features=1,
        num_outputs=1,
        label_rule="x_t ~ N(0, 1) i.i.d.; y = 1 if sum_t x_t > 0 else 0 (binary, BCEWithLogitsLoss)",
        make=sum_sign,
        label=sum_sign_label,
        loss=binary_loss,
        correct=binary_correct,
    ),
}
