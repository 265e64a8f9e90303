"""``--model sliding-window``: causal softmax attention over the last ``--window`` positions only.

Position t attends to positions t - window + 1 .. t (itself included), with rotary positions. The fast
form cuts the sequence into chunks of ``window`` positions: each chunk's queries attend to the keys of
their own chunk and the one before, under one (window, 2 x window) mask, so time and memory grow as
T x window instead of T^2. The slow form (``slow = True``) is dense attention under a banded T x T mask.
What a layer carries from token to token is the keys and values of the last ``window`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distseq.models.attention import CausalSelfAttention, band_mask
from distseq.models.base import register_model
from distseq.models.conv import MAX_SHORT_CONV, SHORT_CONV_HELP
from distseq.models.rotary import check_heads
from distseq.models.stack import stack_for
from distseq.options import MAX_SEQ_LEN, MAX_WIDTH, option
from distseq.tasks import Task, TaskSpec


@dataclass
class SlidingWindowOptions:
    num_heads: int = option(4, "attention heads (must divide --hidden-size)", low=1, high=MAX_WIDTH)
    window: int = option(16, "positions each token attends to, itself included", low=1, high=MAX_SEQ_LEN)
    short_conv: int = option(0, SHORT_CONV_HELP, low=0, high=MAX_SHORT_CONV)


class SlidingWindowAttention(CausalSelfAttention):
    """Attention's projections, rotary positions and optional convolution; only what a query reads differs."""

    def __init__(self, width: int, heads: int, window: int, max_len: int, dropout: float = 0.0, short_conv: int = 0):
        super().__init__(width, heads, dropout, max_len, rope=True, short_conv=short_conv)
        self.window = window
        self.slow = False

    def reach(self, seq_len: int) -> int:
        """Positions a query reads: the last ``window``."""
        return min(self.window, seq_len)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        T = q.shape[2]
        if self.slow or T <= self.window:  # one chunk: the band is the whole mask
            mask = band_mask(T, T, self.window, device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, T, Dh)
        return self.chunked(q, k, v, dropout)

    def chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        B, H, T, Dh = q.shape
        W = self.window
        n = -(-T // W)  # chunks
        pad = n * W - T  # positions past the end: only queries past the end could read them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, H, n W, Dh)
        q = q.view(B, H, n, W, Dh)
        # each chunk's keys and values: the previous chunk's W, then its own W (chunk 0's previous is zeros)
        k, v = (torch.cat([F.pad(t, (0, 0, W, 0))[:, :, : n * W].view(B, H, n, W, Dh), t.view(B, H, n, W, Dh)],
                          dim=3) for t in (k, v))  # (B, H, n, 2W, Dh)
        mask = band_mask(W, 2 * W, W, first_key=-W, device=q.device)  # (W, 2W): same for every chunk
        first = mask & (torch.arange(2 * W, device=q.device) >= W)  # chunk 0: nothing before position 0
        masks = torch.cat([first[None], mask[None].expand(n - 1, W, 2 * W)])  # (n, W, 2W)
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=masks, dropout_p=dropout)  # (B, H, n, W, Dh)
        return mixed.view(B, H, n * W, Dh)[:, :, :T]


@register_model("sliding-window", options=SlidingWindowOptions)
def sliding_window(cfg, task: Task, spec: TaskSpec) -> nn.Module:
    return stack_for(cfg, task, spec, lambda: SlidingWindowAttention(cfg.hidden_size, cfg.num_heads, cfg.window,
                                                                      spec.seq_len, cfg.dropout, cfg.short_conv))


def _validate(cfg) -> None:
    check_heads(cfg.model.hidden_size, cfg.model.num_heads, rotary=True)


sliding_window.validate = _validate
