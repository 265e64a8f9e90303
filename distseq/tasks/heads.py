"""Heads: what a task's labels are and how a prediction is scored against them.

A task names its head (``binary``, ``classes``, ``regression`` or ``per-step``); the head gives the loss
per sample (what training averages), the correctness per sample (what accuracy averages) and, for
per-step heads, whether every labelled step of a sample is right (``solved``). Losses take logits, so
they stay exact under autocast (BCE with logits, never Sigmoid + BCELoss).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

IGNORE = -100  # target of a position that carries no label (CrossEntropyLoss's ignore_index)
REGRESSION_TOLERANCE = 0.04  # a regression prediction counts as correct within this distance


# --- heads: loss and metric per sample ---------------------------------------------------------
def binary_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Logits, not probabilities: BCE-with-logits is the form that stays exact under autocast.
    return F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")  # (B,)


def binary_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((logits > 0).to(torch.float32) == y).to(torch.float32)  # (B,)


def regression_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (pred.float() - y) ** 2  # (B,)


def regression_correct(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred.float() - y).abs() < REGRESSION_TOLERANCE).to(torch.float32)  # (B,)


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
