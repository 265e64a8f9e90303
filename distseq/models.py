"""Sequence models. All share one interface: ``model(x, lengths=None) -> logits``.

x is (B, T, F) features, or (B, T) token ids for a token task (embedded first); logits are (B,) for one output, (B, C) for C classes, or (B, T, C) for a per-step head. ``lengths`` (B,) is given for variable-length batches: recurrent models then run on a packed
sequence and the transformer masks padded keys and pools only valid steps, so padding never changes
a sample's result.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import ModelConfig
from .errors import ConfigError
from .registry import MODELS
from .tasks import Task, TaskSpec

RECURRENT = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def _head_output(logits: torch.Tensor) -> torch.Tensor:
    return logits.squeeze(-1) if logits.shape[-1] == 1 else logits  # (B,) for one output


def input_layer(task: Task, spec: TaskSpec, width: int) -> nn.Module:
    """x -> (B, T, width): a token embedding for a token task, a linear map of the features otherwise."""
    return nn.Embedding(task.vocab(spec), width) if task.tokens else nn.Linear(task.num_features(spec), width)


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
        return _head_output(self.head(self.dropout(last)))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]  # (T, 1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table  # (T, dim)


class TransformerClassifier(nn.Module):
    """Pre-norm transformer encoder (PyTorch's fused attention) with a mean-pooled or per-step head."""

    def __init__(self, embed: nn.Module, d_model: int, num_layers: int, num_heads: int, num_outputs: int,
                 max_len: int, positions: str = "sinusoidal", per_step: bool = False, dropout: float = 0.0):
        super().__init__()
        self.embed = embed  # (B, T[, F]) -> (B, T, D)
        if positions == "learned":
            self.positions = nn.Parameter(torch.randn(max_len, d_model) * 0.02)  # (T, D)
        else:
            self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        layer = nn.TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs)
        self.per_step = per_step
        self.num_layers, self.d_model = num_layers, d_model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight used in a matmul, plus attention's scores and mixing
        (12 x layers x width x sequence length, the PaLM count)."""
        from .flops import matmul_params

        return 6.0 * matmul_params(self) + 12.0 * self.num_layers * self.d_model * seq_len

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        steps = x.shape[1]
        h = self.embed(x) + self.positions[:steps]  # (B, T, D)
        padding = None
        if lengths is not None:
            padding = torch.arange(steps, device=x.device)[None, :] >= lengths.to(x.device)[:, None]  # (B, T)
        h = self.norm(self.encoder(h, src_key_padding_mask=padding))  # (B, T, D)
        if self.per_step:
            return self.head(h)  # (B, T, C)
        if padding is None:
            pooled = h.mean(dim=1)  # (B, D)
        else:
            valid = (~padding).to(h.dtype)[..., None]  # (B, T, 1)
            pooled = (h * valid).sum(dim=1) / valid.sum(dim=1)
        return _head_output(self.head(pooled))


def register_model(name: str):
    """Decorator for an ``nn.Module`` class (or a function) built as ``build(cfg, task, spec)``: make it
    available as ``--model NAME``. ``cfg`` is the ModelConfig (hidden_size, num_layers, dropout, ...);
    ``task.num_features(spec)`` and ``task.num_outputs(spec)`` size it; ``forward(x, lengths=None)``
    returns logits for ``task.head``: (B,) binary or regression, (B, C) classes, (B, T, C) per-step.
    An optional ``validate(cfg)`` attribute checks the whole TrainConfig before anything runs."""

    def register(builder):
        MODELS.add(name, builder)
        return builder

    return register


def build_model(cfg: ModelConfig, task: Task, spec: TaskSpec) -> nn.Module:
    """The registered model ``cfg.kind`` for ``task`` (built-in or a plugin's)."""
    return MODELS.get(cfg.kind)(cfg, task, spec)


def _recurrent(kind: str):
    def build(cfg: ModelConfig, task: Task, spec: TaskSpec) -> nn.Module:
        return RecurrentClassifier(kind, task.num_features(spec), cfg.hidden_size, cfg.num_layers,
                                   task.num_outputs(spec), task.head == "per-step", cfg.bidirectional, cfg.dropout,
                                   task.vocab(spec) if task.tokens else None)

    build.validate = _recurrent_validate
    return build


def _recurrent_validate(cfg) -> None:
    # --positions and --num-heads describe attention models; a recurrent one has neither (a preset's
    # values stay harmless), but tying is a request it cannot meet
    if cfg.model.tie_embeddings:
        raise ConfigError("--tie-embeddings", f"applies to --model decoder (got --model {cfg.model.kind})")


for _kind in RECURRENT:
    register_model(_kind)(_recurrent(_kind))


@register_model("transformer")
def transformer(cfg: ModelConfig, task: Task, spec: TaskSpec) -> nn.Module:
    return TransformerClassifier(input_layer(task, spec, cfg.hidden_size), cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                                 task.num_outputs(spec), spec.seq_len, cfg.positions, task.head == "per-step",
                                 cfg.dropout)


def _transformer_validate(cfg) -> None:
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError("--num-heads", f"{m.num_heads} does not divide --hidden-size {m.hidden_size}")
    if m.bidirectional:
        raise ConfigError("--bidirectional", "applies to rnn, gru and lstm; the transformer sees both directions")
    if m.positions == "rope":
        raise ConfigError("--positions", "rope applies to --model decoder (choose sinusoidal or learned for the "
                                         "transformer)")
    if m.tie_embeddings:
        raise ConfigError("--tie-embeddings", "applies to --model decoder (got --model transformer)")


transformer.validate = _transformer_validate
