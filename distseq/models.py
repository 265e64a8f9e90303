"""Sequence models. All share one interface: ``model(x, lengths=None) -> logits``.

x is (B, T, F); logits are (B,) for one output, (B, C) for C classes, or (B, T, C) for a per-step
head. ``lengths`` (B,) is given for variable-length batches: the recurrence then runs on a packed
sequence, so padding never changes a sample's result.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import ModelConfig
from .tasks import Task, TaskSpec

RECURRENT = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentClassifier(nn.Module):
    """A stacked RNN/GRU/LSTM; the hidden state at each sample's last valid step feeds a linear head."""

    def __init__(self, kind: str, num_features: int, hidden_size: int, num_layers: int, num_outputs: int,
                 per_step: bool = False):
        super().__init__()
        self.rnn = RECURRENT[kind](num_features, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_outputs)
        self.per_step = per_step

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if lengths is None:
            out, _ = self.rnn(x)  # (B, T, H)
            last = out[:, -1]  # (B, H)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])  # (B, T, H)
            last = out[torch.arange(x.shape[0], device=out.device), lengths.to(out.device) - 1]  # (B, H)
        if self.per_step:
            return self.head(out)  # (B, T, C)
        logits = self.head(last)  # (B, C)
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits  # (B,) or (B, C)


def build_model(cfg: ModelConfig, task: Task, spec: TaskSpec) -> nn.Module:
    return RecurrentClassifier(
        cfg.kind, task.num_features(spec), cfg.hidden_size, cfg.num_layers, task.num_outputs(spec),
        per_step=task.head == "per-step",
    )
