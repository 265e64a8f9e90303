"""Sequence models: the registry's front door and the pieces every model shares.

All models share one interface: ``model(x, lengths=None) -> logits``. x is (B, T, F) features, or
(B, T) token ids for a token task (embedded first); logits are (B,) for one output, (B, C) for C
classes, or (B, T, C) for a per-step head. ``lengths`` (B,) is given for variable-length batches:
recurrent models then run on a packed sequence and attention masks padded keys, so padding never
changes a sample's result. A model is built as ``build(cfg, task, spec)`` where ``cfg`` is the model
section (``--hidden-size``, ``--num-layers``, ``--dropout``) with the model's own options readable as
attributes (``cfg.positions``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from distseq.registry import MODELS
from distseq.tasks import Task, TaskSpec


def head_output(logits: torch.Tensor) -> torch.Tensor:
    return logits.squeeze(-1) if logits.shape[-1] == 1 else logits  # (B,) for one output


def input_layer(task: Task, spec: TaskSpec, width: int) -> nn.Module:
    """x -> (B, T, width): a token embedding for a token task, a linear map of the features otherwise."""
    return nn.Embedding(task.vocab(spec), width) if task.tokens else nn.Linear(task.num_features(spec), width)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]  # (T, 1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table  # (T, dim)


def register_model(name: str, options: Optional[type] = None, replaces: bool = False):
    """Decorator for an ``nn.Module`` class (or a function) built as ``build(cfg, task, spec)``: make it
    available as ``--model NAME``. ``cfg`` is the ModelConfig (hidden_size, num_layers, dropout, ...);
    ``task.num_features(spec)`` and ``task.num_outputs(spec)`` size it; ``forward(x, lengths=None)``
    returns logits for ``task.head``: (B,) binary or regression, (B, C) classes, (B, T, C) per-step.
    An optional ``validate(cfg)`` attribute checks the whole TrainConfig before anything runs.

    ``options``: a dataclass of the model's own options (``distseq.options.option`` fields); they become
    command-line flags and config keys of the model section, readable in ``build`` as ``cfg.NAME``.
    ``replaces``: take over a name registered elsewhere (a built-in's); without it that is an error."""

    def register(builder):
        MODELS.add(name, builder, options, replaces=replaces)
        return builder

    return register


def build_model(cfg, task: Task, spec: TaskSpec) -> nn.Module:
    """The registered model ``cfg.kind`` for ``task`` (built-in or a plugin's)."""
    return MODELS.get(cfg.kind)(cfg, task, spec)
