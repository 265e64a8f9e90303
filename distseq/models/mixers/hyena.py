"""``--model hyena``: the Hyena operator (Poli et al. 2023), gated long convolutions with an implicit filter.

The operator of order N projects each position to N + 1 streams v, x_1 .. x_N, mixes each of them over
its last three positions (a short causal depthwise convolution), then alternates a long causal
convolution with a gate: z = v, then z = x_i * (h_i * z) for i = 1 .. N, and a final output projection.
Each long filter h_i is as long as the sequence and is not stored: a small MLP with sine activations
maps features of the position t (t / max_len and a few sines and cosines of it) to one value per
channel, an exponential decay window (a different rate per channel) fades it with the lag, and a
per-channel skip term adds bias * z_t. The filter depends on t and ``max_len`` (the task's sequence
length) only, never on the length of the input, so an output never depends on how long the input is.

The fast form convolves by FFT of length 2T (zero padded: a linear, not circular, convolution), O(T log
T); the slow form (``slow = True``) multiplies by the (T, T) lower-triangular Toeplitz matrix of the
filter, O(T^2). Both run in float64 whatever the input's dtype and round the result back to it: an FFT
spreads the rounding noise of every position into every other, so in float32 a change of a future token
would move earlier outputs by ~1e-7 and break causality bit for bit. In float64 that noise (~1e-16
relative) lies far below float32's and bf16's resolution, so earlier outputs round to the same numbers
(a flip needs the value within ~1e-16 of a rounding boundary: about one number in 1e9).

A layer generating one token at a time keeps every input of each long convolution (the filter is as
long as the sequence; there is no fixed-size recurrence): N x width x seq_len numbers, plus the short
convolution's last two inputs of (N + 1) x width channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distseq.models.base import register_model
from distseq.models.conv import CausalConv
from distseq.models.stack import stack_for
from distseq.options import MAX_WIDTH, option
from distseq.tasks import Task, TaskSpec

SHORT_KERNEL = 3  # the short convolution's reach: a position and the two before it
FEATURE_BANDS = 8  # sine and cosine pairs among the filter's positional features
# Decay windows: the fastest channel's filter falls to DECAY_TARGET of its start at 0.3 x max_len, the
# slowest's at 1.5 x max_len (past the end); the rates between are spread evenly over the channels.
DECAY_TARGET, FASTEST_REACH, SLOWEST_REACH = 1e-2, 0.3, 1.5


@dataclass
class HyenaOptions:
    order: int = option(2, "Hyena's order: long convolutions, each followed by a gate", low=1, high=8)
    filter_width: int = option(64, "width of the MLP that makes Hyena's implicit long filters", low=1,
                               high=MAX_WIDTH)


class Sine(nn.Module):
    """sin(frequency x), one learnable frequency per feature: lets the filter MLP draw oscillations."""

    def __init__(self, width: int):
        super().__init__()
        self.frequency = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.frequency.to(x.dtype) * x)


class ImplicitFilter(nn.Module):
    """The long filters of every order, ``filters(T) -> (N, D, T)``: h_i[c, t] for lags t < T."""

    per_sequence = True  # its weights run once per position of the sequence, not once per token

    def __init__(self, order: int, width: int, hidden: int, max_len: int):
        super().__init__()
        self.order, self.width, self.max_len = order, width, max_len
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * FEATURE_BANDS, hidden), Sine(hidden), nn.Linear(hidden, hidden),
                                 Sine(hidden), nn.Linear(hidden, order * width, bias=False))
        self.bias = nn.Parameter(torch.zeros(order, width))  # (N, D): the skip term, bias * z_t

    def initialize(self) -> None:
        """PyTorch's default Linear init (uniform in +-1/sqrt(fan_in)): the generic N(0, 0.02) would leave
        filters ~1e-3 after three layers; unit sine frequencies; skip terms N(0, 1) as in Hyena."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                module.reset_parameters()
            elif isinstance(module, Sine):
                nn.init.ones_(module.frequency)
        nn.init.normal_(self.bias)

    def features(self, length: int, dtype: torch.dtype, device) -> torch.Tensor:
        """(length, 1 + 2 x bands): t / max_len, then sin and cos of 2 pi f t / max_len for f = 1 .. bands."""
        t = torch.arange(length, dtype=dtype, device=device)[:, None] / self.max_len  # (T, 1)
        angle = 2 * math.pi * t * torch.arange(1, FEATURE_BANDS + 1, dtype=dtype, device=device)  # (T, bands)
        return torch.cat([t, torch.sin(angle), torch.cos(angle)], dim=1)

    def decay(self, length: int, dtype: torch.dtype, device) -> torch.Tensor:
        """(D, length): exp(-rate_c t / max_len), rates spread from slow to fast over the channels."""
        slowest, fastest = -math.log(DECAY_TARGET) / SLOWEST_REACH, -math.log(DECAY_TARGET) / FASTEST_REACH
        rates = torch.linspace(slowest, fastest, self.width, dtype=dtype, device=device)[:, None]  # (D, 1)
        t = torch.arange(length, dtype=dtype, device=device) / self.max_len  # (T,)
        return torch.exp(-rates * t)

    def forward(self, length: int) -> torch.Tensor:
        if length > self.max_len:
            raise ValueError(f"hyena: a sequence of {length} positions is longer than the filters made for "
                             f"--seq-len {self.max_len}")
        # At least float32 and outside autocast: bf16 positions (8 bits) would merge neighbouring lags of a
        # long filter. Per sequence, so the cost is small.
        dtype = torch.promote_types(self.bias.dtype, torch.float32)
        device = self.bias.device
        with torch.autocast(device.type, enabled=False):
            h = self.features(length, dtype, device)  # (T, F)
            for module in self.mlp:
                h = linear_in(module, h) if isinstance(module, nn.Linear) else module(h)  # (T, hidden), then (T, N D)
            h = h.T.reshape(self.order, self.width, length)  # (N, D, T)
            return h * self.decay(length, dtype, device)  # (N, D, T)


def linear_in(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in x's dtype (its weights may be bf16 under FSDP's mixed precision)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def fft_causal_conv(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s<=t} h_{t-s} z_s by FFT: z (B, C, T), h (C, T) -> (B, C, T). Zero padding to 2T keeps
    the wrapped-around terms of the circular convolution out of the first T outputs."""
    T = z.shape[-1]
    spectrum = torch.fft.rfft(z, n=2 * T) * torch.fft.rfft(h, n=2 * T)  # (B, C, T + 1)
    return torch.fft.irfft(spectrum, n=2 * T)[..., :T]


def direct_causal_conv(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The same convolution as a product with the lower-triangular Toeplitz matrix of h, O(T^2)."""
    T = z.shape[-1]
    lag = torch.arange(T, device=z.device)[:, None] - torch.arange(T, device=z.device)  # (T, T): t - s
    toeplitz = h[:, lag.clamp(min=0)] * (lag >= 0)  # (C, T, T): h_{t-s} where s <= t, else 0
    return torch.einsum("cts,bcs->bct", toeplitz, z)


def long_conv(z: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, slow: bool = False) -> torch.Tensor:
    """sum_{s<=t} h_{t-s} z_s + bias z_t: z (B, C, T), h (C, T), bias (C,) -> (B, C, T) in z's dtype.

    Computed in float64 and rounded back once: float32's FFT noise would reach earlier positions (see the
    module's docstring). Autocast is off so that it cannot take the FFT back down to a lower precision."""
    with torch.autocast(z.device.type, enabled=False):
        z64, h64, bias64 = z.double(), h.double(), bias.double()
        mixed = direct_causal_conv(z64, h64) if slow else fft_causal_conv(z64, h64)  # (B, C, T)
        return (mixed + bias64[:, None] * z64).to(z.dtype)


class HyenaMixer(nn.Module):
    def __init__(self, width: int, order: int, filter_width: int, max_len: int):
        super().__init__()
        self.width, self.order = width, order
        streams = (order + 1) * width
        self.in_proj = nn.Linear(width, streams)
        self.short_conv = CausalConv(streams, SHORT_KERNEL)
        self.filter = ImplicitFilter(order, width, filter_width, max_len)
        self.out_proj = nn.Linear(width, width)
        self.slow = False

    def initialize(self) -> None:
        self.filter.initialize()

    def mixing_flops(self, seq_len: int) -> float:
        """Per long convolution and channel, approximately: two real FFTs of length 2T (the input's and the
        inverse; the filter's is per sequence) at 2.5 n log2 n each over T tokens, 10 log2(2T); the complex
        product, ~6; the skip term and the gate, 2. In all N x width x (10 log2(2T) + 8)."""
        return self.order * self.width * (10.0 * math.log2(2 * seq_len) + 8.0)

    def state_size(self, seq_len: int) -> int:
        """Every input of each long convolution, and the short convolution's last two inputs."""
        return self.order * self.width * seq_len + self.short_conv.state_size()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        B, T, D = u.shape
        streams = self.short_conv(self.in_proj(u)).transpose(1, 2)  # (B, (N+1) D, T)
        v, *gates = streams.split(D, dim=1)  # each (B, D, T)
        filters = self.filter(T)  # (N, D, T)
        z = v
        for gate, h, bias in zip(gates, filters, self.filter.bias):
            z = gate * long_conv(z, h, bias, self.slow)  # (B, D, T)
        return self.out_proj(z.transpose(1, 2))  # (B, T, D)


@register_model("hyena", options=HyenaOptions)
def hyena(cfg, task: Task, spec: TaskSpec) -> nn.Module:
    return stack_for(cfg, task, spec, lambda: HyenaMixer(cfg.hidden_size, cfg.order, cfg.filter_width, spec.seq_len))
