"""``--model rnn|gru|lstm``: stacked (bi)directional recurrent networks; the final hidden state of each
direction (or every step's output, for a per-step head) feeds a linear head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from distseq.models.base import head_output, register_model
from distseq.options import option
from distseq.tasks import Task, TaskSpec

RECURRENT = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class RecurrentOptions:
    bidirectional: bool = option(False, "run the recurrent layers in both directions")


class RecurrentClassifier(nn.Module):
    """Stacked (bi)RNN/GRU/LSTM; the final hidden state of each direction feeds a linear head."""

    def __init__(self, kind: str, num_features: int, hidden_size: int, num_layers: int, num_outputs: int,
                 per_step: bool = False, bidirectional: bool = False, dropout: float = 0.0,
                 vocab_size: Optional[int] = None):
        super().__init__()
        # token ids are embedded at the hidden width first; features go straight into the recurrence
        self.embed = nn.Embedding(vocab_size, hidden_size) if vocab_size else None
        self.rnn = RECURRENT[kind](hidden_size if vocab_size else num_features, hidden_size, num_layers=num_layers,
                                   batch_first=True, bidirectional=bidirectional,
                                   dropout=dropout if num_layers > 1 else 0.0)
        self.directions = 2 if bidirectional else 1
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.directions * hidden_size, num_outputs)
        self.per_step = per_step
        self.states = (2 if kind == "lstm" else 1) * self.directions * hidden_size  # LSTM: h and c

    @property
    def causal(self) -> bool:
        """Whether the output at t reads tokens 0..t only (one direction): what generation needs."""
        return self.directions == 1

    def state_size(self, seq_len: int) -> int:
        """The hidden state (and an LSTM's cell) of each direction: what one layer carries to the next token."""
        return self.states

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)  # (B, T) ids -> (B, T, H)
        if lengths is None:
            out, state = self.rnn(x)  # out (B, T, D*H)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, state = self.rnn(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, T, D*H)
        if self.per_step:
            return self.head(self.dropout(out))  # (B, T, C)
        h_n = state[0] if isinstance(state, tuple) else state  # (layers*D, B, H): each sample's last valid step
        last = torch.cat(list(h_n[-self.directions:]), dim=-1)  # (B, D*H)
        return head_output(self.head(self.dropout(last)))


def _recurrent(kind: str):
    def build(cfg, task: Task, spec: TaskSpec) -> nn.Module:
        return RecurrentClassifier(kind, task.num_features(spec), cfg.hidden_size, cfg.num_layers,
                                   task.num_outputs(spec), task.head == "per-step", cfg.bidirectional, cfg.dropout,
                                   task.vocab(spec) if task.tokens else None)

    return build


for _kind in RECURRENT:
    register_model(_kind, options=RecurrentOptions)(_recurrent(_kind))
