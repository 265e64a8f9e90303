"""Sequence classifiers. Every model maps x (B, T, F) to logits (B,) for one output, (B, C) for more."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .tasks import Task

RECURRENT = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentClassifier(nn.Module):
    """A stacked RNN/GRU/LSTM whose last time step's hidden state feeds a linear head."""

    def __init__(self, kind: str, num_features: int, hidden_size: int, num_layers: int, num_outputs: int):
        super().__init__()
        self.rnn = RECURRENT[kind](num_features, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # (B, T, H)
        logits = self.head(out[:, -1])  # (B, C)
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits  # (B,) or (B, C)


def build_model(cfg: ModelConfig, task: Task) -> nn.Module:
    return RecurrentClassifier(cfg.kind, task.num_features, cfg.hidden_size, cfg.num_layers, task.num_outputs)
