"""The overhead suite: ``distseq train`` against a hand-written PyTorch loop, and where its step time goes.

Both train the same model (LSTM, hidden 256) on the same stream (sum-sign, seq 32, batch 256) with the
same recipe (AdamW, warmup + cosine, gradient clipping), fp32, one process, logging every 50 steps,
alternately in one process, so the machine's noise falls on both. Steps/s counts training time only:
distseq's ``train_seconds`` leaves out its evaluation and checkpoint writes, which the plain loop
does not do at all. ``overhead_ratio`` = median distseq steps/s / median plain steps/s.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from ..config import TrainConfig, preset
from ..data import Layout, SampleSource, micro_batches, train_loader
from ..models import build_model
from ..registry import TASKS

LOG_EVERY = 50


def overhead_config(steps: int, run_dir: str) -> TrainConfig:
    cfg = preset("default")
    cfg.model.kind, cfg.model.hidden_size = "lstm", 256
    cfg.data.seq_len, cfg.data.eval_size = 32, 256
    cfg.train.global_batch_size, cfg.train.precision = 256, "no"
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.run_dir = steps, 0, run_dir
    cfg.log.log_every, cfg.log.progress = LOG_EVERY, False
    cfg.checkpoint.resume = "never"
    return cfg


def plain_loop_steps_per_sec(cfg: TrainConfig) -> float:
    """What a user writes by hand for the same training: no harness, the same stream and recipe."""
    from ..runtime import local_device
    from ..optim import build_optimizer

    torch.manual_seed(cfg.train.seed)
    device = local_device()  # where distseq trains too
    spec, steps, batch_size = cfg.task_spec(), cfg.train.max_steps, cfg.train.global_batch_size
    model = build_model(cfg.model, TASKS[cfg.data.task], spec).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, steps)  # the function distseq train uses
    source = SampleSource(cfg.data.task, spec, cfg.train.seed, cfg.data.block_size, "train")
    loader = train_loader(source, Layout(batch_size, 1, 1), 0, 0, steps, cfg.data.samples_per_example, 0)
    batches = micro_batches(loader, batch_size)
    logged = []
    started = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        logits = model(batch["x"].to(device, non_blocking=True))  # (B,)
        loss = F.binary_cross_entropy_with_logits(logits, batch["y"].to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        if (step + 1) % cfg.log.log_every == 0:
            logged.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - started)


def overhead_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    from ..runtime import set_cpu_threads
    from ..loop import train

    set_cpu_threads()  # the thread count train() uses, for the plain loop too
    steps, repeats = (10, 3) if quick else (100, 3)
    rates: Dict[str, list] = {"distseq": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        plain_loop_steps_per_sec(overhead_config(3, f"{tmp}/warmup"))  # first-use costs land on neither side
        for repeat in range(repeats):
            rates["distseq"].append(train(overhead_config(steps, f"{tmp}/{repeat}"))["steps_per_sec"])
            rates["plain"].append(plain_loop_steps_per_sec(overhead_config(steps, f"{tmp}/plain")))
            log(f"  overhead repeat {repeat + 1}/{repeats}: distseq {rates['distseq'][-1]:.2f} steps/s, "
                f"plain {rates['plain'][-1]:.2f} steps/s")
    ours, plain = statistics.median(rates["distseq"]), statistics.median(rates["plain"])
    return {"overhead_ratio": ours / plain, "distseq_steps_per_sec": ours, "plain_steps_per_sec": plain,
            "repeats": rates, "steps": steps, "torch_threads": torch.get_num_threads(),
            "config": {"model": "lstm", "hidden_size": 256, "seq_len": 32, "batch": 256, "precision": "fp32",
                       "log_every": LOG_EVERY}}


def profile_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    """One profiled ``distseq train`` of the overhead config: the share of step time per phase."""
    from ..loop import train

    steps, window = (12, "2:12") if quick else (100, "20:70")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = overhead_config(steps, tmp)
        cfg.log.profile_steps = window
        profile = train(cfg)["profile"]
    return {"step_time_shares": profile["step_time_shares"], "step_ms": profile["step_ms"],
            "profiled_steps": profile["steps"], "top_operators": profile["top_operators"]}
