"""--compile: the model's forward compiled by ``torch.compile`` (inductor), on CPU as on GPU.

**Where.** Under FSDP2, each block's forward (as torchtitan does: the repeated block compiles once, and
FSDP's gathers and reductions stay outside the graphs, in its hooks); otherwise the whole model's forward,
under DDP or alone. The forward is replaced on the module itself, so the module tree is unchanged:
state_dict keys, checkpoints, ``export``, ``eval``, ``predict`` and ``load_model`` never see a compiler
wrapper (no ``_orig_mod.``), and a compiled run resumes uncompiled and the reverse.

**Shapes.** Every batch is padded to --seq-len (variable lengths travel as values in ``lengths``, not as
shapes) and the micro-batch is the same every step, so the training graphs compile once: no dimension
needs marking dynamic and no lengths need bucketing. Evaluation runs eagerly (``force_eager``): its
batches have another size and no gradients, and would each compile graphs of their own.

**When.** Compiling happens at a forward's first call. ``warm_up`` makes that call before the first
step: one forward and backward of the first micro-batch, gradients discarded and the random state put
back, so the first step starts from the random state an eager run's would (inductor draws dropout masks
from a stream of its own: with dropout a compiled run is not the eager run to the bit). Its seconds are the
start-up phase ``compile`` (outside training time, so outside tokens/s), and a model the compiler rejects
(dynamo's or inductor's own errors; not out-of-memory or a lost peer) is refused in one line there, before
any step.

**Recompilations.** Dynamo's count of compiled frames after the warm-up: ``compile.recompiles`` in
summary.json, and a warning at the log step that sees it grow, naming dynamo's reason (the guard that
failed).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, List, Optional

import torch
from torch import nn

from distseq.distributed.sharding import blocks, is_sharded
from distseq.errors import ConfigError


def compile_model(model: nn.Module, per_block: bool, backend: str = "inductor") -> str:
    """Compile ``model``'s forward in place, or each block's (``per_block``: under FSDP2; a model without
    blocks is compiled whole); the line saying what was compiled."""
    # a fresh start: dynamo keeps at most a few compilations per function, and an earlier run in this process
    # (distseq.train called again, a test session) would have used them up on modules that no longer train
    torch._dynamo.reset()
    from torch._dynamo.utils import clear_compilation_metrics

    clear_compilation_metrics()  # the recompilation reasons named are this run's
    units: List[nn.Module] = blocks(model) if per_block else []
    for unit in units or [model]:
        unit.forward = torch.compile(unit.forward, backend=backend)
    return f"compile: {f'{len(units)} block(s)' if units else 'the whole model'} (torch.compile, {backend})"


def frames_compiled() -> int:
    """Frames dynamo has compiled in this process so far (a recompilation is one more)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def last_recompile_reason() -> Optional[str]:
    """Dynamo's reason for its newest recompilation (the guard that failed), if it recorded one."""
    from torch._dynamo.utils import get_compilation_metrics

    for metrics in reversed(get_compilation_metrics()):
        if metrics.recompile_reason:
            return " ".join(metrics.recompile_reason.split())
    return None


class CompileWatch:
    """The compile phase and the recompilations after it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.after_warm_up: Optional[int] = None
        self.reported = 0

    def warm_up(self, model: nn.Module, run_batch: Callable[[], torch.Tensor], reduction: Callable,
                device: torch.device, name: str) -> None:
        """Compile by running ``run_batch`` (forward and loss of the first micro-batch) and its backward once,
        inside ``reduction()`` (``warm_up_reduction``); gradients and random state as they were."""
        began = time.perf_counter()
        devices = [device] if device.type == "cuda" else []
        from torch._dynamo.exc import TorchDynamoException
        from torch._inductor.exc import CppCompileError, LoweringException, OperatorIssue

        try:
            with torch.random.fork_rng(devices=devices), reduction():
                run_batch().backward()
        except (TorchDynamoException, OperatorIssue, LoweringException, CppCompileError) as error:
            # the compiler's own failures only: out of memory or a lost peer stay what they are
            raise ConfigError("--compile", f"model {name} cannot be compiled here ({type(error).__name__}: "
                                           f"{what_failed(error)}); train it without --compile") from None
        for param in model.parameters():
            param.grad = None
        self.seconds = time.perf_counter() - began
        self.after_warm_up = frames_compiled()

    @property
    def recompiles(self) -> int:
        return 0 if self.after_warm_up is None else frames_compiled() - self.after_warm_up

    def news(self) -> Optional[str]:
        """A warning when there were recompilations since the last call, else None."""
        count = self.recompiles
        if count <= self.reported:
            return None
        self.reported = count
        reason = last_recompile_reason()
        return (f"distseq: warning: --compile: {count} recompilation(s) since the first step"
                + (f"; the latest because {reason}" if reason else "")
                + ": each costs compile time; fixed shapes and dtypes avoid them")

    def report(self) -> dict:
        return {"seconds": round(self.seconds, 3), "recompiles": self.recompiles}


def what_failed(error: Exception, limit: int = 400) -> str:
    """The line of a compiler error that says what failed: dynamo's explanation when it gives one, else its
    first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    explained = next((line for line in lines if line.startswith("Explanation:")), None)
    text = " ".join(explained.split()[1:]) if explained else lines[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def warm_up_reduction(accelerator, model: nn.Module) -> Callable:
    """A context factory for the warm-up's backward: DDP's ``no_sync`` (the gradients stay in ``.grad``,
    which the warm-up clears). Under FSDP2 the gradients are reduced as usual: with its reduction off it
    would keep them in an unsharded buffer of its own that the next step's reduction adds in."""
    if is_sharded(model):
        return contextlib.nullcontext
    return lambda: accelerator.no_sync(model)
