"""--activation-checkpointing: keep fewer activations for the backward and recompute the rest.

- ``full``: each block keeps only its input; the backward runs the block's forward again. On long
  sequences the activations, not the weights, bound what fits: this trades one more forward for them.
- ``selective``: each block keeps the outputs of its matrix multiplies and attention (the costly ops)
  and recomputes the cheap ones in between (norms, activations, dropout masks, residual adds), as
  torchtitan's per-op policy does. A block's forward must not write into tensors in place (the built-in
  blocks do not); a model without blocks is refused (``check_recompute``).

A block is an element of the model's outermost ``nn.ModuleList`` (the unit FSDP2 shards); a model without
blocks (the recurrent ones) is one block. The forward is replaced on the module itself, so the module tree
and its state_dict keys stay as they are. Recomputation replays the same random state (dropout masks),
so the results are those of a run without it: bit-exact in fp32 for the same step order. It composes
with FSDP2 (each block's parameters are gathered again for its recomputation) and with --compile
(applied first, so the compiled graphs hold the recomputation).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from distseq.distributed.sharding import blocks
from distseq.errors import ConfigError

MODES = ("none", "full", "selective")

# The outputs kept under ``selective``: matrix multiplies and attention, whose recomputation costs most.
_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.linear.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default, _aten._scaled_dot_product_cudnn_attention.default,
    _aten.convolution.default, _aten._fft_r2c.default, _aten._fft_c2r.default, _aten._fft_c2c.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def checkpointed(forward: Callable, mode: str) -> Callable:
    """``forward`` run under activation checkpointing of kind ``mode`` (full or selective)."""
    options = {"context_fn": _selective_contexts} if mode == "selective" else {}

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and generation keep nothing anyway
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)

    return run


def check_recompute(model: nn.Module, mode: str, name: str, device: torch.device) -> None:
    """``selective`` needs blocks: its policy keeps a block's matrix multiplies, and a model without blocks
    (a recurrence) runs ops in place inside its kernels, which a selective replay would corrupt. On a GPU,
    cuDNN draws the dropout between a recurrence's layers from a random state of its own, which a
    recomputation cannot replay: its gradients would silently differ."""
    if mode == "none":
        return
    if mode == "selective" and not blocks(model):
        raise ConfigError("--activation-checkpointing", f"selective keeps each block's matrix multiplies, and model "
                                                        f"{name} has no blocks (no nn.ModuleList); use full")
    if device.type == "cuda" and any(isinstance(m, nn.RNNBase) and m.dropout > 0 for m in model.modules()):
        raise ConfigError("--activation-checkpointing", f"model {name}'s dropout between recurrent layers is drawn "
                                                        f"by cuDNN, which a recomputation cannot replay; use --dropout "
                                                        f"0 or no activation checkpointing on a GPU")


def recompute_blocks(model: nn.Module, mode: str) -> str:
    """Apply ``mode`` to every block of ``model`` in place; the line saying what it did ("" for none)."""
    if mode == "none":
        return ""
    units = blocks(model) or [model]
    for unit in units:
        unit.forward = checkpointed(unit.forward, mode)
    what = "the whole model (it has no blocks)" if units == [model] else f"{len(units)} block(s)"
    return f"activation checkpointing: {mode} over {what}"
