"""Rotary positions (RoPE) for the attention mixers, and the head checks they share."""

from __future__ import annotations

import torch

from distseq.errors import ConfigError

ROPE_BASE = 10000.0


def rope_tables(length: int, head_dim: int) -> torch.Tensor:
    """(2, T, head_dim / 2): cos and sin of each position's rotation angles."""
    inverse = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (Dh/2,)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inverse  # (T, Dh/2)
    return torch.stack([angles.cos(), angles.sin()])


def rotate(x: torch.Tensor, tables: torch.Tensor, start: int = 0) -> torch.Tensor:
    """x (B, H, T, Dh) at positions start .. start + T - 1, rotated pairwise (first half with second half) by
    each position's angles."""
    end = start + x.shape[2]
    cos, sin = tables[0, start:end].to(x.dtype), tables[1, start:end].to(x.dtype)  # (T, Dh/2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def check_heads(width: int, heads: int, rotary: bool, field: str = "--num-heads", rotary_field: str = "") -> None:
    """Heads (``field``) split the width evenly; rotary positions also need an even width per head (the error
    names ``rotary_field``, by default ``field``)."""
    if width % heads:
        raise ConfigError(field, f"{heads} does not divide --hidden-size {width}")
    if rotary and (width // heads) % 2:
        raise ConfigError(rotary_field or field, f"rotary positions rotate pairs of dimensions: --hidden-size / "
                                                 f"{field} = {width // heads} must be even")
