"""The causal token model every sequence mixer shares: embedding, pre-norm blocks, final norm, logits.

A **mixer** is the part of a block that moves information along the sequence (attention, a linear
attention, a long convolution, a state space); everything else is common: token embedding (or a linear
map of features), optional added positions, ``num_layers`` pre-norm blocks ``h + mixer(norm(h))`` then
``h + mlp(norm(h))`` (a GELU MLP of 4 x width), a final norm and per-position logits. For a task with one
label per sequence the logits of each sample's last valid position answer: a causal mixer has seen the
whole sample there, and padding after it never reaches it.

A mixer is an ``nn.Module`` ``(B, T, D) -> (B, T, D)``, causal, with two figures of its own:

- ``mixing_flops(seq_len)``: forward FLOPs per token of the sequence mixing itself, beyond its weights'
  matrix multiplies (which ``flops.matmul_params`` counts): attention's scores and weighted sums, a
  linear attention's state update, an FFT. Training counts 3x (forward and backward).
- ``state_size(seq_len)``: the numbers this layer carries from one token to the next when it generates
  one token at a time (Zoology's x-axis): attention's keys and values grow with the sequence, a
  recurrence's state does not.

A mixer with a ``forward_cached(h, layer_cache)`` method (causal attention and the window's) lets the
stack generate with a cache (``new_cache``, ``forward_cached``): each new token then costs one position.

A mixer whose parameters need more than N(0, 0.02) weights and zero biases (decay rates, filters) sets
them in an ``initialize()`` method, called after the generic initialisation. Mixers with a slow reference
form (a step-by-step recurrence, a direct convolution, a dense mask) take it when their ``slow``
attribute is set: the tests prove the fast form equal to it.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import nn

from distseq.models.base import head_output, input_layer, sinusoidal_positions
from distseq.models.cache import DecodeCache, LayerCache
from distseq.models.flops import matmul_params


class Block(nn.Module):
    """Pre-norm: h + mixer(norm(h)), then h + mlp(norm(h)). The mixer is the attribute ``mixer_name``."""

    def __init__(self, width: int, mixer: nn.Module, dropout: float, mixer_name: str = "mixer"):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mixer_name = mixer_name
        self._modules[mixer_name] = mixer  # saved under this name; read as .mixer whatever the name
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    @property
    def mixer(self) -> nn.Module:
        return self._modules[self.mixer_name]

    def forward(self, h: torch.Tensor, cache: Optional[LayerCache] = None) -> torch.Tensor:
        """``cache``: generation's, for a mixer with a cached form (``MixerStack.forward_cached``)."""
        mixed = self.mixer(self.norm1(h)) if cache is None else self.mixer.forward_cached(self.norm1(h), cache)
        h = h + self.drop(mixed)
        return h + self.drop(self.mlp(self.norm2(h)))


class MixerStack(nn.Module):
    causal = True  # every mixer is: the logits at t read tokens 0..t only (what generation needs)

    def __init__(self, embed: nn.Module, width: int, mixers: List[nn.Module], num_outputs: int, max_len: int,
                 positions: str = "none", per_step: bool = True, dropout: float = 0.0, tie: bool = False,
                 mixer_name: str = "mixer"):
        super().__init__()
        self.embed = embed  # (B, T[, F]) -> (B, T, D)
        self.blocks = nn.ModuleList(Block(width, mixer, dropout, mixer_name) for mixer in mixers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_outputs, bias=False)
        self.drop = nn.Dropout(dropout)
        self.per_step, self.width = per_step, width
        if positions == "learned":
            self.positions = nn.Parameter(torch.randn(max_len, width) * 0.02)  # (T, D)
        else:  # a fixed table, or none (rotary positions live in the mixer; other mixers need none)
            table = sinusoidal_positions(max_len, width) if positions == "sinusoidal" else None
            self.register_buffer("positions", table, persistent=False)
        self.apply(init_weights)
        for block in self.blocks:  # a mixer's own initialisation (decays, filters) wins over the generic one
            own = getattr(block.mixer, "initialize", None)
            if callable(own):
                own()
        if tie:
            self.head.weight = self.embed.weight  # (C, D): the embedding table, C = vocabulary

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def mixers(self) -> List[nn.Module]:
        return [block.mixer for block in self.blocks]

    def flops_per_token(self, seq_len: int) -> float:
        """6 per matmul weight (a tied output layer included) + 3 x each mixer's forward mixing FLOPs."""
        return 6.0 * matmul_params(self) + 3.0 * sum(m.mixing_flops(seq_len) for m in self.mixers())

    def state_size(self, seq_len: int) -> int:
        """Numbers one layer carries from token to token (the largest layer's, should they differ)."""
        return max(m.state_size(seq_len) for m in self.mixers())

    def embedded(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x (B, T[, F]) at positions start .. start + T - 1 -> (B, T, D), positions added (if any)."""
        h = self.embed(x)  # (B, T, D)
        if self.positions is not None:
            h = h + self.positions[start:start + x.shape[1]]
        return self.drop(h)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.embedded(x)  # (B, T, D)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)  # (B, T, D)
        if self.per_step:
            return self.head(h)  # (B, T, C)
        last = (lengths.to(h.device, non_blocking=True) - 1) if lengths is not None else \
            torch.full((h.shape[0],), h.shape[1] - 1, device=h.device)
        return head_output(self.head(h[torch.arange(h.shape[0], device=h.device), last]))  # (B,) or (B, C)

    def new_cache(self) -> Optional[DecodeCache]:
        """An empty cache for ``forward_cached``; None when some mixer has no cached form."""
        if not self.per_step or not all(callable(getattr(m, "forward_cached", None)) for m in self.mixers()):
            return None
        return DecodeCache.empty(self.num_layers)

    def forward_cached(self, x: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """Per-step logits (B, T, C) of x (B, T), the tokens after the ``cache.length`` that ``cache`` holds,
        equal (to rounding) to those ``forward`` gives these positions of the whole sequence; ``cache`` then
        holds them too. Eval mode; positions stay below the tables' ``max_len``."""
        h = self.embedded(x, cache.length)  # (B, T, D)
        for block, layer in zip(self.blocks, cache.layers):
            h = block(h, layer)
        return self.head(self.norm(h))  # (B, T, C)


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases (PyTorch's N(0, 1) embedding would make a
    tied output layer's first logits huge)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def stack_for(cfg, task, spec, mixer: Callable[[], nn.Module], positions: str = "none", tie: bool = False,
              mixer_name: str = "mixer") -> MixerStack:
    """The model of ``cfg`` (width, layers, dropout) for ``task``: ``cfg.num_layers`` blocks, each with a
    mixer made by ``mixer()``."""
    return MixerStack(input_layer(task, spec, cfg.hidden_size), cfg.hidden_size,
                      [mixer() for _ in range(cfg.num_layers)], task.num_outputs(spec), spec.seq_len, positions,
                      task.head == "per-step", cfg.dropout, tie, mixer_name)
