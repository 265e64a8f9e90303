"""Model FLOPs: what a researcher compares across sizes and machines.

Training FLOPs per token are 6 per weight used in a matrix multiply (2 forward, 4 backward;
Kaplan et al. 2020; biases and norms are left out), plus attention's score and mixing products for attention
models: 12 x layers x
width x sequence length (the count PaLM uses; a causal model does about half of it usefully).
Embedding lookups are not multiplies; an output layer tied to the embedding is. A model may say
better for itself with a ``flops_per_token(seq_len)`` method. MFU divides achieved model FLOP/s by
the device's peak dense bf16 FLOP/s, known for common GPUs only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# peak dense bf16 tensor FLOP/s per GPU, by a name fragment of torch.cuda.get_device_name (vendor data
# sheets, without sparsity); the first fragment found in the name wins, so a fragment comes before any
# shorter one it contains (H100 PCIe before H100, GH200 before H200, L40S before L40 before L4)
PEAK_BF16_FLOPS = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("GH200", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("MI300X", 1307e12), ("MI250X", 383e12),
)


ADDED_TABLES = ("positions",)  # parameters of this name are added to the inputs, never multiplied


def matmul_params(model: nn.Module) -> int:
    """Weights used in matrix multiplies of every token: every parameter of 2 or more dimensions (Linear,
    attention's projections, RNN/GRU/LSTM, convolutions), each counted once. Embedding tables are looked up,
    not multiplied, unless another layer shares one (a tied output layer); biases and norms (1-D) and
    position tables (named ``positions``, added to the inputs) are not multiplies either; nor are the
    weights of a module marked ``per_sequence = True`` (an implicit filter: it runs once per position of
    the sequence, for the whole batch, not once per token)."""
    per_sequence = {id(p) for module in model.modules() if getattr(module, "per_sequence", False)
                    for p in module.parameters()}
    weights = {id(p): p for module in model.modules() if not isinstance(module, nn.Embedding)
               for name, p in module.named_parameters(recurse=False)
               if p.dim() >= 2 and name not in ADDED_TABLES and id(p) not in per_sequence}
    return sum(p.numel() for p in weights.values())


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (time step) of ``model`` on sequences of ``seq_len``."""
    own = getattr(model, "flops_per_token", None)
    if callable(own):
        return float(own(seq_len))
    return 6.0 * matmul_params(model)


def state_size(model: nn.Module, seq_len: int) -> Optional[int]:
    """Numbers one layer of ``model`` carries from token to token on sequences of ``seq_len`` (Zoology's
    axis), from the model's own ``state_size(seq_len)``; None for a model that does not say."""
    own = getattr(model, "state_size", None)
    return int(own(seq_len)) if callable(own) else None


def peak_flops(device: torch.device) -> Optional[float]:
    """The device's peak dense bf16 FLOP/s, or None when it is not a GPU in the table."""
    return peak_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_for_name(name: str) -> Optional[float]:
    """The table's peak for a GPU named ``name`` (as torch.cuda.get_device_name spells it), or None."""
    return next((peak for fragment, peak in PEAK_BF16_FLOPS if fragment in name), None)
