"""Before the first step: the task's first samples and the model's output on them, checked against the
task's head.

A plugin's mistake (a model whose logits have the wrong shape or batch size, a task whose labels have
the wrong dtype, a ``make`` that raises) would otherwise surface as a traceback from inside the loss,
on every rank. Here it is one line naming the task or the model, what was expected and what came,
before anything of the run is written. The check draws the stream's own first block (as training will)
and runs one forward of the model as built, in eval mode, without gradients, the random state restored:
training starts exactly as unchecked.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from distseq.data.contract import batch_problem
from distseq.data.stream import SampleSource
from distseq.errors import ConfigError, describe
from distseq.registry import TASKS
from distseq.tasks import Batch, Task, TaskSpec
from distseq.training.evaluation import forward

SAMPLES = 2  # the model's forward: enough rows that a fixed or lost batch dimension shows, and cheap


def preflight(cfg, model: nn.Module, model_name: str, device: torch.device) -> None:
    """The task's first block (synthetic data: --data-files rows were checked as they were indexed) and
    one forward of ``model`` on its first samples, on ``device`` as training will run it; a ConfigError or
    TaskContractError says what is wrong. The random state is the same afterwards."""
    d, spec = cfg.data, cfg.task_spec()
    task = TASKS[d.task]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if d.data_files:
            lengths = torch.full((SAMPLES,), spec.seq_len, dtype=torch.int64) if spec.variable else None
            block = {"x": task.example_input(SAMPLES, spec), **({"lengths": lengths} if lengths is not None else {})}
        else:
            block = first_samples(d.task, spec, cfg.train.seed, d.block_size)
        check_model(model.to(device), model_name, d.task, task, spec, block)


def first_samples(name: str, spec: TaskSpec, seed: int, block_size: int) -> Batch:
    """The stream's first block, as training draws it, checked against what the task declares (a make
    that raises is the stream's TaskContractError, already one line)."""
    source = SampleSource(name, spec, seed, block_size, "train")
    block = source.block(0)
    problem = batch_problem(block, block_size, spec, source.task, 0)
    if problem:
        raise ConfigError("--task", f"{name}: {problem}")
    return block


def expected_logits(task: Task, spec: TaskSpec, n: int) -> Tuple[int, ...]:
    """The shape of the logits the task's head takes for ``n`` samples."""
    C, T = task.num_outputs(spec), spec.seq_len
    return {"binary": (n,), "regression": (n,), "classes": (n, C), "per-step": (n, T, C)}[task.head]


def check_model(model: nn.Module, model_name: str, task_name: str, task: Task, spec: TaskSpec, block: Batch) -> None:
    """One forward of ``model`` on the first samples of ``block``: logits of the head's shape, floating."""
    n = min(SAMPLES, block["x"].shape[0])
    batch = {key: value[:n] for key, value in block.items()}
    device = next(iter(model.parameters()), torch.empty(0)).device
    output = _forward(model, batch, device, spec.variable, model_name, task_name)
    want = expected_logits(task, spec, n)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    if shape != want or not output.is_floating_point():
        came = f"{shape} {str(output.dtype).replace('torch.', '')}" if shape is not None else type(output).__name__
        raise ConfigError("--model", f"{model_name} returned {came} on {n} samples of --task {task_name}; its head "
                                     f"{task.head!r} takes floating logits of shape {want}")


def _forward(model: nn.Module, batch: Batch, device: torch.device, variable: bool, model_name: str, task_name: str):
    """As the loop calls it (``evaluation.forward``), in eval mode, each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return forward(model, batch, device, variable)
    except Exception as error:  # the model's own code
        x = batch["x"]
        raise ConfigError("--model", f"{model_name} raised {describe(error)} in a forward on {x.shape[0]} samples "
                                     f"of --task {task_name} (x {tuple(x.shape)})") from None
    finally:
        for module, training in modes:
            module.training = training
