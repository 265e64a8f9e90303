"""Causal softmax attention as a mixer: the decoder's, and the base of the window's (which reads fewer
positions). Registers nothing, so the models built on it import it in any order."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distseq.models.cache import LayerCache
from distseq.models.conv import CausalConv
from distseq.models.rotary import rope_tables, rotate


def band_mask(queries: int, keys: int, window: int, first_key: int = 0, device=None) -> torch.Tensor:
    """(queries, keys) bool: query i (position i) may read key j (position first_key + j) when
    0 <= i - position < window."""
    distance = torch.arange(queries, device=device)[:, None] - (first_key + torch.arange(keys, device=device))
    return (distance >= 0) & (distance < window)


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

    def reach(self, seq_len: int) -> int:
        """Positions a query reads: every earlier one."""
        return seq_len

    def mixing_flops(self, seq_len: int) -> float:
        """Scores and weighted sums: 2 x 2 x width x the positions read (PaLM's count: every position, not the
        causal half)."""
        return 4.0 * self.width * self.reach(seq_len)

    def state_size(self, seq_len: int) -> int:
        """The keys and values of the positions read (and the convolution's last inputs)."""
        return 2 * self.width * self.reach(seq_len) + (self.conv.state_size() if self.conv is not None else 0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        if self.conv is not None:
            h = self.conv(h)  # (B, T, D): each position with the tokens just before it
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        if self.rope is not None:
            q, k = rotate(q, self.rope), rotate(k, self.rope)
        mixed = self.attend(q, k, v, self.dropout if self.training else 0.0)  # (B, H, T, Dh)
        return self.out(mixed.transpose(1, 2).reshape(B, T, D))

    def forward_cached(self, h: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """``forward`` of new positions h (B, T, D) that follow the ``cache.length`` positions whose keys and
        values ``cache`` holds (eval mode: no dropout); their own are added, beyond the positions a later query
        reads (``reach``) dropped."""
        B, T, D = h.shape
        start = cache.length
        if self.conv is not None:
            h, cache.conv = self.conv.forward_cached(h, cache.conv)  # (B, T, D)
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        if self.rope is not None:
            q, k = rotate(q, self.rope, start), rotate(k, self.rope, start)
        if cache.keys is not None:
            k, v = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)  # (B, H, L + T, Dh)
        reach = self.reach(start + T)
        first = start + T - k.shape[2]  # the position of the first key held
        if T == 1 and k.shape[2] <= reach:  # one query reading every key held (the usual step): no mask
            mask = None
        else:
            mask = band_mask(T, k.shape[2], reach, first_key=first - start, device=h.device)  # (T, L + T)
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        cache.keys, cache.values = k[:, :, -reach:], v[:, :, -reach:]  # a later query reads no earlier one
        cache.length = start + T
        return self.out(mixed.transpose(1, 2).reshape(B, T, D))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)  # (B, H, T, Dh)
