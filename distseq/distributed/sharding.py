"""How the model's state lies across processes: one process, DDP replicas, or FSDP2 shards.

distseq applies FSDP2 (``torch.distributed.fsdp.fully_shard``) itself, the way torchtitan does: each
block (every element of an ``nn.ModuleList``, e.g. transformer layers or decoder blocks) is one
FSDP unit, then the root takes the rest (embeddings, recurrent layers, norms, head). The same code
shards on CPU with gloo and on GPU with nccl. accelerate's own FSDP plugin is not used: on a CPU
machine it falls back to plain replicas without a word, so a test here could not prove it.

Mixed precision under FSDP is FSDP2's policy, not autocast: parameters are all-gathered and computed
in bf16 when the precision probe allows it, gradients are reduced in fp32 and the sharded fp32
parameters take the optimizer's update; the root's output is fp32 for the loss.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, List

import torch
from torch import nn

from distseq.config.world import LAUNCH_FSDP


@contextlib.contextmanager
def accelerate_without_fsdp() -> Iterator[None]:
    """Build the Accelerator as for replicas even under an FSDP launch config: distseq shards the model
    itself, and accelerate's FSDP state would wrap it a second time (on GPU) or be ignored (on CPU)."""
    saved = os.environ.pop(LAUNCH_FSDP, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[LAUNCH_FSDP] = saved


def blocks(model: nn.Module) -> List[nn.Module]:
    """The model's repeated blocks: the elements of its outermost ``nn.ModuleList``s."""
    found: List[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                found.extend(child)
            else:
                visit(child)

    visit(model)
    return found


def shard_model(model: nn.Module, precision: str, device: torch.device) -> str:
    """Apply FSDP2 to every block and to the root over all processes, in place; one line saying what
    was sharded. ``precision`` is the resolved --precision: bf16 computes in bf16, reductions stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not torch.distributed.is_initialized():  # one process: a group of one, so the path is the same
        torch.distributed.init_process_group("gloo" if device.type == "cpu" else "nccl",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    compute = torch.bfloat16 if precision == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    units = blocks(model)
    for block in units:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # the root's output in fp32 for the loss; the blocks' stay in the compute dtype for the root's own layers
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32,
                                                                 output_dtype=torch.float32))
    total = sum(p.numel() for p in model.parameters())
    return (f"fsdp: {len(units)} block(s) + root sharded over {world} process(es), {total:,} parameters, "
            f"compute {'bf16' if compute else 'fp32'}, reductions fp32")


def quiet_fsdp_warnings() -> None:
    """FSDP2 warns when the root returns a view that an in-place op could corrupt; the loop never
    writes into the model's output, so the warning would only be noise on every step's first call."""
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Under FSDP, reduce-scatter gradients only on the micro-batch that ends an optimizer step
    (accelerate's ``accumulate`` skips the all-reduce of DDP replicas itself)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (e.g. the global gradient norm), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def as_fsdp_computes(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` that computes as FSDP2's policy makes it (for the precision probe, which runs
    before any process group): parameters in ``dtype``, buffers as they are, floating inputs cast to
    ``dtype`` where each block and the root begin, the root's output in fp32."""
    import copy

    def cast_inputs(module, args, kwargs):
        def cast(value):
            return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    probe = copy.deepcopy(model)
    for param in probe.parameters():
        param.data = param.data.to(dtype)
    for unit in [*blocks(probe), probe]:
        unit.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    probe.register_forward_hook(lambda module, args, output: output.float())
    return probe
