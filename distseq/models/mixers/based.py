"""``--model based``: Based (Arora et al. 2024), a linear attention with a Taylor feature map beside a
small sliding-window softmax attention.

Each layer's mixer adds two parts. The linear attention first runs a short causal depthwise convolution
(3 taps) over its input, so that a token's query, key and value already know the tokens just before it
(one layer then binds a key to the value that follows it). Its queries and keys (``--feature-dim`` d'
per head) go through the feature map phi(x) = [1, x / d'^(1/4), vec(x x^T) / sqrt(2 d')] of size
F = 1 + d' + d'^2, whose dot product phi(q).phi(k) = 1 + a + a^2 / 2 with a = q.k / sqrt(d') is the
second-order Taylor expansion of exp(a): positive everywhere, so the normalised read-out
y_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / sum_{s<=t} phi(q_t).phi(k_s) never divides by zero. The other
part is ``SlidingWindowAttention`` over the last ``--window`` tokens (exact softmax, rotary positions),
which the linear attention's smooth weights cannot match on nearby tokens.

The fast form cuts the sequence into chunks of ``chunk`` positions: inside a chunk the weights come
straight from q.k (a C x C matrix, the future set to exact zeros), and each chunk reads the running
state of the chunks before it, S = sum phi(k)^T v and z = sum phi(k); time and memory grow linearly
with T. The slow form (``slow = True``) is the step-by-step recurrence on (S, z), and the window part's
dense banded mask. What a layer carries from token to token: S and z (F x width + F x heads), the
convolution's last 2 inputs, and the window's keys and values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distseq.models.base import register_model
from distseq.models.conv import CausalConv
from distseq.models.mixers.sliding_window import SlidingWindowAttention
from distseq.models.rotary import check_heads
from distseq.models.stack import stack_for
from distseq.options import MAX_SEQ_LEN, MAX_WIDTH, option
from distseq.tasks import Task, TaskSpec

SHORT_CONV = 3  # taps of the causal convolution before the linear attention: a token and the 2 before it
EPS = 1e-6  # the normaliser is at least t / 2 already (1 + a + a^2/2 >= 1/2); this only guards rounding


@dataclass
class BasedOptions:
    num_heads: int = option(4, "heads of the window attention (must divide --hidden-size)", low=1, high=MAX_WIDTH)
    feature_heads: int = option(1, "heads of the linear attention (must divide --hidden-size); each has "
                                   "--feature-dim query and key features", low=1, high=MAX_WIDTH)
    feature_dim: int = option(16, "query and key width per head of the linear attention; its state grows as its "
                                  "square", low=1, high=256)
    window: int = option(16, "positions the window attention reads, itself included", low=1, high=MAX_SEQ_LEN)


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., 1 + d + d^2), so that taylor_features(q).taylor_features(k) = taylor_kernel(q.k / sqrt(d))."""
    d = x.shape[-1]
    ones = x.new_ones(*x.shape[:-1], 1)  # (..., 1)
    products = (x[..., :, None] * x[..., None, :]).flatten(-2)  # (..., d^2): every x_i x_j
    return torch.cat([ones, x / d ** 0.25, products / math.sqrt(2 * d)], dim=-1)


def taylor_kernel(a: torch.Tensor) -> torch.Tensor:
    """1 + a + a^2 / 2: exp(a) to second order, at least 1/2."""
    return 1 + a + a * a / 2


def exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of the entries strictly before each index along ``dim`` (zero first). A running sum minus the
    entry itself would not do: its rounding would let a later entry move an earlier result."""
    earlier = x.narrow(dim, 0, x.shape[dim] - 1).cumsum(dim)
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), earlier], dim=dim)


def chunked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """q, k (B, H, T, d), v (B, H, T, Dh) -> (B, H, T, Dh): the normalised Taylor linear attention, in
    chunks of ``chunk`` positions."""
    B, H, T, d = q.shape
    Dh = v.shape[-1]
    n = -(-T // chunk)  # chunks
    pad = n * chunk - T  # positions past the end, in the last chunk: no real query reads them
    q, k, v = (F.pad(t, (0, 0, 0, pad)).view(B, H, n, chunk, t.shape[-1]) for t in (q, k, v))  # (B, H, n, C, .)

    # inside a chunk: the kernel from q.k directly (d products per pair instead of F), the future exactly zero
    weights = taylor_kernel(q @ k.transpose(-1, -2) / math.sqrt(d))  # (B, H, n, C, C)
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)  # (C, C)
    weights = weights.masked_fill(future, 0.0)
    numerator = weights @ v  # (B, H, n, C, Dh)
    denominator = weights.sum(-1)  # (B, H, n, C)

    # across chunks: each chunk reads the state the chunks before it left
    query_features, key_features = taylor_features(q), taylor_features(k)  # (B, H, n, C, F)
    states = exclusive_cumsum(key_features.transpose(-1, -2) @ v, dim=2)  # (B, H, n, F, Dh): S before each chunk
    sums = exclusive_cumsum(key_features.sum(-2), dim=2)  # (B, H, n, F): z before each chunk
    numerator = numerator + query_features @ states  # (B, H, n, C, Dh)
    denominator = denominator + (query_features @ sums[..., None]).squeeze(-1)  # (B, H, n, C)
    mixed = numerator / (denominator[..., None] + EPS)  # (B, H, n, C, Dh)
    return mixed.view(B, H, n * chunk, Dh)[:, :, :T]


def recurrent_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same as ``chunked_linear_attention``, one token at a time on the state (S, z): the reference."""
    query_features, key_features = taylor_features(q), taylor_features(k)  # (B, H, T, F)
    B, H, T, Fd = query_features.shape
    state = v.new_zeros(B, H, Fd, v.shape[-1])  # S: (B, H, F, Dh)
    sums = v.new_zeros(B, H, Fd)  # z: (B, H, F)
    steps = []
    for t in range(T):
        state = state + key_features[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, F, Dh)
        sums = sums + key_features[:, :, t]
        numerator = (query_features[:, :, t, None, :] @ state).squeeze(-2)  # (B, H, Dh)
        denominator = (query_features[:, :, t] * sums).sum(-1)  # (B, H)
        steps.append(numerator / (denominator[..., None] + EPS))
    return torch.stack(steps, dim=2)  # (B, H, T, Dh)


class TaylorLinearAttention(nn.Module):
    """The linear half of Based: short causal convolution, then the normalised Taylor linear attention."""

    def __init__(self, width: int, heads: int, feature_dim: int):
        super().__init__()
        self.conv = CausalConv(width, SHORT_CONV)
        self.q = nn.Linear(width, heads * feature_dim)
        self.k = nn.Linear(width, heads * feature_dim)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.width, self.heads, self.feature_dim = width, heads, feature_dim
        self.chunk = 64  # of 32, 64 and 128 the fastest, by a little (one CPU thread, batch 4, seq 2048, width 64)
        self.slow = False

    @property
    def features(self) -> int:
        return 1 + self.feature_dim + self.feature_dim ** 2

    def mixing_flops(self, seq_len: int) -> float:
        """The recurrent form's count (the chunked form does somewhat more inside a chunk): the feature maps'
        d'^2 products for queries and keys, the state update (2 F width, F heads for z) and the read-out
        (2 F width, 2 F heads for the normaliser)."""
        features, D, H = self.features, self.width, self.heads
        feature_maps = 2.0 * H * self.feature_dim ** 2
        update = 2 * features * D + features * H
        read_out = 2 * features * D + 2 * features * H
        return feature_maps + update + read_out

    def state_size(self, seq_len: int) -> int:
        """S and z of every head, and the convolution's last SHORT_CONV - 1 inputs."""
        return self.features * (self.width + self.heads) + self.conv.state_size()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        H, d = self.heads, self.feature_dim
        x = self.conv(h)  # (B, T, D): position t mixes inputs t - 2 .. t
        q = self.q(x).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        k = self.k(x).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        v = self.v(x).view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, Dh)
        # squares and long sums lose too much in bf16: at least float32 (float64 stays float64)
        precise = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            q, k, v = q.to(precise), k.to(precise), v.to(precise)
            mixed = recurrent_linear_attention(q, k, v) if self.slow else chunked_linear_attention(q, k, v, self.chunk)
        return self.out(mixed.transpose(1, 2).reshape(B, T, D).to(h.dtype))


class BasedMixer(nn.Module):
    """Taylor linear attention + sliding-window attention, summed. Setting ``slow`` or ``chunk`` here
    sets it on the part that has it."""

    def __init__(self, width: int, heads: int, feature_dim: int, window: int, max_len: int, dropout: float = 0.0,
                 feature_heads: int = 1):
        super().__init__()
        self.linear = TaylorLinearAttention(width, feature_heads, feature_dim)
        self.window = SlidingWindowAttention(width, heads, window, max_len, dropout)

    @property
    def slow(self) -> bool:
        return self.linear.slow

    @slow.setter
    def slow(self, value: bool) -> None:
        self.linear.slow = self.window.slow = value

    @property
    def chunk(self) -> int:
        return self.linear.chunk

    @chunk.setter
    def chunk(self, value: int) -> None:
        self.linear.chunk = value

    def mixing_flops(self, seq_len: int) -> float:
        return self.linear.mixing_flops(seq_len) + self.window.mixing_flops(seq_len)

    def state_size(self, seq_len: int) -> int:
        return self.linear.state_size(seq_len) + self.window.state_size(seq_len)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h) + self.window(h)  # (B, T, D)


@register_model("based", options=BasedOptions)
def based(cfg, task: Task, spec: TaskSpec) -> nn.Module:
    return stack_for(cfg, task, spec, lambda: BasedMixer(cfg.hidden_size, cfg.num_heads, cfg.feature_dim,
                                                         cfg.window, spec.seq_len, cfg.dropout, cfg.feature_heads))


def _validate(cfg) -> None:
    check_heads(cfg.model.hidden_size, cfg.model.num_heads, rotary=True)  # the window part's rotary positions
    check_heads(cfg.model.hidden_size, cfg.model.feature_heads, rotary=False, field="--feature-heads")


based.validate = _validate
