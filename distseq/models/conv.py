"""The short causal convolution the mixers share: each channel mixes its own last few positions.

Zoology's MQAR models all put one in front of their mixer (its BaseConv): with it, the token at t already
holds the token at t - 1, so one lookup binds a key to the value that follows it, which attention alone
must first learn with a previous-token head. Based, Hyena and Mamba-2 have one by design.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

MAX_SHORT_CONV = 64
SHORT_CONV_HELP = ("taps of a short causal convolution of the attention's input (Zoology's MQAR models put one "
                   "in front of every mixer: a key then sees the token before it); 0 = none")


class CausalConv(nn.Conv1d):
    """Depthwise convolution over time, (B, T, C) -> (B, T, C): output t reads inputs t - taps + 1 .. t of its
    own channel (zeros before the start), never a later one."""

    def __init__(self, channels: int, taps: int):
        super().__init__(channels, channels, taps, groups=channels)
        self.taps = taps

    def state_size(self) -> int:
        """The last taps - 1 inputs of every channel: what it carries from token to token."""
        return (self.taps - 1) * self.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x.transpose(1, 2), (self.taps - 1, 0))  # (B, C, taps - 1 + T): zeros before the start
        return super().forward(padded).transpose(1, 2)  # (B, T, C)

    def forward_cached(self, x: torch.Tensor, past: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) following the inputs ``past`` (B, taps - 1, C; None at the start: zeros): the output
        (B, T, C), as ``forward`` gives it for these positions of the whole sequence, and the new ``past``."""
        if past is None:
            past = x.new_zeros(x.shape[0], self.taps - 1, x.shape[2])
        joined = torch.cat([past, x], dim=1)  # (B, taps - 1 + T, C)
        out = super().forward(joined.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return out, joined[:, joined.shape[1] - (self.taps - 1):]
