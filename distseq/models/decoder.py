"""``--model decoder``: a causal decoder-only transformer (GPT-style), the model of token research.

The shared block stack (``stack.py``) with causal self-attention as its mixer
(``scaled_dot_product_attention(is_causal=True)``: PyTorch's fused kernels). Positions: rotary
(``--positions rope``, applied to queries and keys), learned or sinusoidal (added to the embedding).
``--tie-embeddings`` makes the output layer share the token embedding's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distseq.errors import ConfigError
from distseq.models.base import register_model
from distseq.models.conv import MAX_SHORT_CONV, SHORT_CONV_HELP, CausalConv
from distseq.models.rotary import check_heads, rope_tables, rotate
from distseq.models.stack import stack_for
from distseq.options import MAX_WIDTH, option
from distseq.registry import TASKS
from distseq.tasks import Task, TaskSpec


@dataclass
class DecoderOptions:
    num_heads: int = option(4, "attention heads (must divide --hidden-size)", low=1, high=MAX_WIDTH)
    positions: Literal["sinusoidal", "learned", "rope"] = option(
        "sinusoidal", "position encoding: added to the embedding (sinusoidal, learned) or rotary (rope)")
    tie_embeddings: bool = option(False, "on a token task, the output layer shares the token embedding's weights")
    short_conv: int = option(0, SHORT_CONV_HELP, low=0, high=MAX_SHORT_CONV)


class CausalSelfAttention(nn.Module):
    """Causal softmax attention over every earlier position (PyTorch's fused kernels), rotary positions
    optional (its own table), a short causal convolution of its input optional."""

    def __init__(self, width: int, heads: int, dropout: float, max_len: int, rope: bool, short_conv: int = 0):
        super().__init__()
        self.conv = CausalConv(width, short_conv) if short_conv else None
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.heads, self.dropout, self.width = heads, dropout, width
        self.register_buffer("rope", rope_tables(max_len, width // heads) if rope else None, persistent=False)

    def mixing_flops(self, seq_len: int) -> float:
        """Scores and weighted sums: 2 x 2 x width x seq_len (PaLM's count: every position, not the causal half)."""
        return 4.0 * self.width * seq_len

    def state_size(self, seq_len: int) -> int:
        """The keys and values of every earlier token (and the convolution's last inputs)."""
        return 2 * self.width * seq_len + (self.conv.state_size() if self.conv is not None else 0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        if self.conv is not None:
            h = self.conv(h)  # (B, T, D): each position with the tokens just before it
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        if self.rope is not None:
            q, k = rotate(q, self.rope), rotate(k, self.rope)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, Dh)
        return self.out(mixed.transpose(1, 2).reshape(B, T, D))


@register_model("decoder", options=DecoderOptions)
def decoder(cfg, task: Task, spec: TaskSpec) -> nn.Module:
    # the mixer's attribute keeps the name release 0.1 saved its weights under
    return stack_for(cfg, task, spec, lambda: CausalSelfAttention(cfg.hidden_size, cfg.num_heads, cfg.dropout,
                                                                   spec.seq_len, cfg.positions == "rope",
                                                                   cfg.short_conv),
                     positions="none" if cfg.positions == "rope" else cfg.positions, tie=cfg.tie_embeddings,
                     mixer_name="attention")


def _decoder_validate(cfg) -> None:
    m = cfg.model
    check_heads(m.hidden_size, m.num_heads, m.positions == "rope", rotary_field="--positions")
    if m.tie_embeddings:
        task, spec = TASKS[cfg.data.task], cfg.task_spec()
        if not task.tokens or task.num_outputs(spec) != task.vocab(spec):
            raise ConfigError("--tie-embeddings", f"needs a token task whose outputs are its vocabulary "
                                                  f"({cfg.data.task} is not one)")


decoder.validate = _decoder_validate
