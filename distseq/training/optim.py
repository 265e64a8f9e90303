"""The optimizer and its learning-rate schedule, built in one place (training and the bench use it).

AdamW is the fused implementation (one kernel over every parameter, on CPU and GPU alike). Besides
speed, it takes a skip flag on the device (``found_inf``, 1.0 = leave every parameter, moment and step
count as they are), which is how a step with a non-finite loss or gradient is skipped on every rank
without the host waiting for the device to learn that it was.

The schedule is a pure function of the step and the optim options, so it is never restored from a
checkpoint: it is placed at the step directly (O(1), also for --start-step), and options the user
changed on resume (learning rate, weight decay, warmup, floor, --max-steps) take effect from there.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch

from distseq.config import OptimConfig


def lr_factor(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """Linear warmup to 1, then constant or cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, max_steps: int
                    ) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (decoupled weight decay; 0 = Adam) and its warmup + cosine/constant schedule at step 0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, max_steps))


def apply_options(optimizer, scheduler, cfg: OptimConfig, step: int) -> None:
    """Make the optim options the ones in force and put the schedule at ``step`` in O(1).

    Loading an optimizer's state also restores the hyperparameters it was saved with; this puts the
    configured learning rate and weight decay back, so a resume honours what the user changed, and the
    fused implementation (a checkpoint of an unfused AdamW loads with its flags: ``fused`` is put back,
    and its step counts move to the parameters' device, where the fused kernel reads them).
    """
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
        group["fused"], group["foreach"] = True, None
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state and state["step"].device != param.device:
                state["step"] = state["step"].to(param.device)
    scheduler.last_epoch = step
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def skip_step_where(optimizer, flag: torch.Tensor) -> None:
    """The next ``step()`` leaves every parameter, moment and step count as it is where ``flag`` (a () float
    on the parameters' device) is 1.0; decided on the device, so the host never waits to learn it. Under
    fp16 the grad scaler sets this itself (its overflow flag) and a non-finite loss overflows it too."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    inner.found_inf = flag
