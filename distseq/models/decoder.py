"""``--model decoder``: a causal decoder-only transformer (GPT-style), the model of token research.

Token embedding (or a linear map of features), pre-norm blocks of causal self-attention
(``scaled_dot_product_attention(is_causal=True)``: PyTorch's fused kernels) and a GELU MLP, a final
norm and per-position logits. Positions: rotary (``--positions rope``, applied to queries and keys),
learned or sinusoidal (added to the embedding). ``--tie-embeddings`` makes the output layer share the
token embedding's weights. For a task with one label per sequence the logits of each sample's last
valid position answer: causal attention has seen the whole sample there, and padding after it never
reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from distseq.errors import ConfigError
from distseq.models.base import head_output, input_layer, register_model, sinusoidal_positions
from distseq.models.flops import matmul_params
from distseq.options import MAX_WIDTH, option
from distseq.registry import TASKS
from distseq.tasks import Task, TaskSpec

ROPE_BASE = 10000.0


@dataclass
class DecoderOptions:
    num_heads: int = option(4, "attention heads (must divide --hidden-size)", low=1, high=MAX_WIDTH)
    positions: Literal["sinusoidal", "learned", "rope"] = option(
        "sinusoidal", "position encoding: added to the embedding (sinusoidal, learned) or rotary (rope)")
    tie_embeddings: bool = option(False, "on a token task, the output layer shares the token embedding's weights")


def rope_tables(length: int, head_dim: int) -> torch.Tensor:
    """(2, T, head_dim / 2): cos and sin of each position's rotation angles."""
    inverse = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (Dh/2,)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inverse  # (T, Dh/2)
    return torch.stack([angles.cos(), angles.sin()])


def rotate(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh) rotated pairwise (first half with second half) by each position's angles."""
    cos, sin = tables[0, : x.shape[2]].to(x.dtype), tables[1, : x.shape[2]].to(x.dtype)  # (T, Dh/2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.heads, self.dropout = heads, dropout

    def forward(self, h: torch.Tensor, rope: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, D = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, Dh)
        return self.out(mixed.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm: h + attention(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, rope: Optional[torch.Tensor]) -> torch.Tensor:
        h = h + self.drop(self.attention(self.norm1(h), rope))
        return h + self.drop(self.mlp(self.norm2(h)))


class Decoder(nn.Module):
    def __init__(self, embed: nn.Module, width: int, num_layers: int, heads: int, num_outputs: int, max_len: int,
                 positions: str = "rope", per_step: bool = True, dropout: float = 0.0, tie: bool = False):
        super().__init__()
        self.embed = embed  # (B, T[, F]) -> (B, T, D)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_outputs, bias=False)
        self.drop = nn.Dropout(dropout)
        self.per_step, self.num_layers, self.width = per_step, num_layers, width
        if positions == "learned":
            self.positions = nn.Parameter(torch.randn(max_len, width) * 0.02)  # (T, D)
        else:  # a fixed table, or none under rope
            table = sinusoidal_positions(max_len, width) if positions == "sinusoidal" else None
            self.register_buffer("positions", table, persistent=False)
        self.register_buffer("rope", rope_tables(max_len, width // heads) if positions == "rope" else None,
                             persistent=False)
        self.apply(_init)
        if tie:
            self.head.weight = self.embed.weight  # (C, D): the embedding table, C = vocabulary

    def flops_per_token(self, seq_len: int) -> float:
        """6 per matmul weight (a tied output layer included) + 12 x layers x width x seq_len."""
        return 6.0 * matmul_params(self) + 12.0 * self.num_layers * self.width * seq_len

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.embed(x)  # (B, T, D)
        if self.positions is not None:
            h = h + self.positions[: x.shape[1]]
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, self.rope)
        h = self.norm(h)  # (B, T, D)
        if self.per_step:
            return self.head(h)  # (B, T, C)
        last = (lengths.to(h.device) - 1) if lengths is not None else torch.full((h.shape[0],), h.shape[1] - 1,
                                                                                 device=h.device)
        return head_output(self.head(h[torch.arange(h.shape[0], device=h.device), last]))  # (B,) or (B, C)


def _init(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases (PyTorch's N(0, 1) embedding would make a
    tied output layer's first logits huge)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


@register_model("decoder", options=DecoderOptions)
def decoder(cfg, task: Task, spec: TaskSpec) -> nn.Module:
    return Decoder(input_layer(task, spec, cfg.hidden_size), cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                   task.num_outputs(spec), spec.seq_len, cfg.positions, task.head == "per-step", cfg.dropout,
                   cfg.tie_embeddings)


def _decoder_validate(cfg) -> None:
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError("--num-heads", f"{m.num_heads} does not divide --hidden-size {m.hidden_size}")
    if m.positions == "rope" and (m.hidden_size // m.num_heads) % 2:
        raise ConfigError("--positions", f"rope rotates pairs of dimensions: --hidden-size / --num-heads = "
                                         f"{m.hidden_size // m.num_heads} must be even")
    if m.tie_embeddings:
        task, spec = TASKS[cfg.data.task], cfg.task_spec()
        if not task.tokens or task.num_outputs(spec) != task.vocab(spec):
            raise ConfigError("--tie-embeddings", f"needs a token task whose outputs are its vocabulary "
                                                  f"({cfg.data.task} is not one)")


decoder.validate = _decoder_validate
