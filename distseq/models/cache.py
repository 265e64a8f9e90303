"""What a causal model carries from one generated token to the next, so that each new token costs one
position instead of the whole context: per layer, the attention's keys and values (and its short
convolution's last inputs), and the position the next token takes.

Only generation uses it (``MixerStack.forward_cached``); training's ``forward`` never sees a cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class LayerCache:
    """One layer's state; its mixer reads and extends it."""

    keys: Optional[torch.Tensor] = None  # (B, H, L, Dh): the last L positions' keys (every one, or a window's)
    values: Optional[torch.Tensor] = None  # (B, H, L, Dh)
    conv: Optional[torch.Tensor] = None  # (B, taps - 1, D): the short convolution's last inputs
    length: int = 0  # positions this layer has seen: the next token's position


@dataclass
class DecodeCache:
    """Every layer's state for one batch of sequences that grow together."""

    layers: List[LayerCache] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int) -> "DecodeCache":
        return cls([LayerCache() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        """Positions fed so far (every layer has seen the same)."""
        return self.layers[0].length if self.layers else 0
