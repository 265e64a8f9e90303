"""``--model transformer``: a pre-norm transformer encoder (PyTorch's fused attention, GELU) with a
mean-pooled head over the valid steps, or a per-step head; padded keys are masked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from distseq.errors import ConfigError
from distseq.models.base import head_output, input_layer, register_model, sinusoidal_positions
from distseq.models.flops import matmul_params
from distseq.options import MAX_WIDTH, option
from distseq.tasks import Task, TaskSpec


@dataclass
class EncoderOptions:
    num_heads: int = option(4, "attention heads (must divide --hidden-size)", low=1, high=MAX_WIDTH)
    positions: Literal["sinusoidal", "learned"] = option("sinusoidal", "position encoding added to the inputs")


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
        return 6.0 * matmul_params(self) + 12.0 * self.num_layers * self.d_model * seq_len

    def state_size(self, seq_len: int) -> int:
        """The keys and values of every token (it reads both directions: there is no token-by-token form)."""
        return 2 * self.d_model * seq_len

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        steps = x.shape[1]
        h = self.embed(x) + self.positions[:steps]  # (B, T, D)
        padding = None
        if lengths is not None:
            lengths = lengths.to(x.device, non_blocking=True)  # from pinned memory on a GPU: no wait
            padding = torch.arange(steps, device=x.device)[None, :] >= lengths[:, None]  # (B, T)
        h = self.norm(self.encoder(h, src_key_padding_mask=padding))  # (B, T, D)
        if self.per_step:
            return self.head(h)  # (B, T, C)
        if padding is None:
            pooled = h.mean(dim=1)  # (B, D)
        else:
            valid = (~padding).to(h.dtype)[..., None]  # (B, T, 1)
            pooled = (h * valid).sum(dim=1) / valid.sum(dim=1)
        return head_output(self.head(pooled))


@register_model("transformer", options=EncoderOptions)
def transformer(cfg, task: Task, spec: TaskSpec) -> nn.Module:
    return TransformerClassifier(input_layer(task, spec, cfg.hidden_size), cfg.hidden_size,
                                 cfg.num_layers, cfg.num_heads,
                                 task.num_outputs(spec), spec.seq_len, cfg.positions, task.head == "per-step",
                                 cfg.dropout)


def _transformer_validate(cfg) -> None:
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError("--num-heads", f"{m.num_heads} does not divide --hidden-size {m.hidden_size}")


transformer.validate = _transformer_validate
