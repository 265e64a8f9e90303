"""The overhead suite: ``distseq train`` against a hand-written PyTorch loop, and where its step time goes.

Both train the same model on the same stream with the same recipe (AdamW, warmup + cosine, gradient
clipping), fp32, one process, logging every 50 steps, alternately in one process, so the machine's
noise falls on both. Two workloads: an LSTM (hidden 256) on sum-sign (seq 32, batch 256), and the
causal decoder (2 layers, width 64) on mqar (seq 256, batch 32) in tokens. Throughput counts
training time only: distseq's ``train_seconds`` leaves out its evaluation and checkpoint writes,
which the plain loop does not do at all. ``overhead_ratio`` = median distseq steps/s / median plain
steps/s on the LSTM; ``decoder_overhead_ratio`` the same in tokens/s on the decoder.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from distseq.config import TrainConfig, preset
from distseq.data.stream import Layout, SampleSource, micro_batches, train_loader
from distseq.models import build_model
from distseq.registry import TASKS
from distseq.tasks import IGNORE

LOG_EVERY = 50
DECODER = {"task": "mqar", "seq_len": 256, "vocab_size": 512, "num_kv_pairs": 16, "batch": 32, "hidden_size": 64,
           "num_layers": 2, "num_heads": 2, "positions": "rope"}


def overhead_config(steps: int, run_dir: str) -> TrainConfig:
    cfg = preset("default")
    cfg.model.kind, cfg.model.hidden_size = "lstm", 256
    cfg.data.seq_len, cfg.data.eval_size = 32, 256
    cfg.train.global_batch_size, cfg.train.precision = 256, "no"
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.run_dir = steps, 0, run_dir
    cfg.log.log_every, cfg.log.progress = LOG_EVERY, False
    cfg.checkpoint.resume = "never"
    return cfg


def decoder_config(steps: int, run_dir: str) -> TrainConfig:
    cfg = preset("mqar")
    d = DECODER
    cfg.data.task, cfg.data.seq_len, cfg.data.vocab_size = d["task"], d["seq_len"], d["vocab_size"]
    cfg.data.num_kv_pairs, cfg.data.eval_size = d["num_kv_pairs"], 64
    cfg.model.kind, cfg.model.hidden_size, cfg.model.num_layers = "decoder", d["hidden_size"], d["num_layers"]
    cfg.model.num_heads, cfg.model.positions = d["num_heads"], d["positions"]
    cfg.train.global_batch_size, cfg.train.precision = d["batch"], "no"
    cfg.train.max_steps, cfg.train.eval_every, cfg.train.run_dir = steps, 0, run_dir
    cfg.log.log_every, cfg.log.progress = LOG_EVERY, False
    cfg.checkpoint.resume = "never"
    return cfg


def plain_loss(head: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if head == "binary":
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)  # (B*T, C)


def plain_loop_steps_per_sec(cfg: TrainConfig) -> float:
    """What a user writes by hand for the same training: no harness, the same stream and recipe."""
    from distseq.distributed.accelerator import local_device
    from distseq.training.optim import build_optimizer

    torch.manual_seed(cfg.train.seed)
    device = local_device()  # where distseq trains too
    spec, steps, batch_size = cfg.task_spec(), cfg.train.max_steps, cfg.train.global_batch_size
    task = TASKS[cfg.data.task]
    model = build_model(cfg.model, task, spec).to(device)
    optimizer, scheduler = build_optimizer(model, cfg.optim, steps)  # the function distseq train uses
    source = SampleSource(cfg.data.task, spec, cfg.train.seed, cfg.data.block_size, "train")
    loader = train_loader(source, Layout(batch_size, 1, 1), 0, 0, steps, cfg.data.samples_per_example, 0)
    batches = micro_batches(loader, batch_size)
    logged = []
    started = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        logits = model(batch["x"].to(device, non_blocking=True))  # (B,) or (B, T, C)
        loss = plain_loss(task.head, logits, batch["y"].to(device, non_blocking=True))
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


def compare(make_config: Callable[[int, str], TrainConfig], steps: int, repeats: int, label: str,
            log: Callable[[str], None]) -> Dict[str, list]:
    """Steps/s of ``distseq train`` and of the plain loop on the same config, alternated ``repeats`` times."""
    from distseq.training.loop import train

    rates: Dict[str, list] = {"distseq": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        plain_loop_steps_per_sec(make_config(3, f"{tmp}/warmup"))  # first-use costs land on neither side
        for repeat in range(repeats):
            rates["distseq"].append(train(make_config(steps, f"{tmp}/{repeat}"))["steps_per_sec"])
            rates["plain"].append(plain_loop_steps_per_sec(make_config(steps, f"{tmp}/plain")))
            log(f"  {label} repeat {repeat + 1}/{repeats}: distseq {rates['distseq'][-1]:.2f} steps/s, "
                f"plain {rates['plain'][-1]:.2f} steps/s")
    return rates


def overhead_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    from distseq.distributed.accelerator import set_cpu_threads

    set_cpu_threads()  # the thread count train() uses, for the plain loop too
    steps, repeats = (10, 1) if quick else (100, 3)
    rates = compare(overhead_config, steps, repeats, "overhead (lstm)", log)
    ours, plain = statistics.median(rates["distseq"]), statistics.median(rates["plain"])
    decoder_steps = 4 if quick else 100
    decoder = compare(decoder_config, decoder_steps, repeats, "overhead (decoder, mqar)", log)
    tokens_per_step = DECODER["batch"] * DECODER["seq_len"]
    ours_tokens = statistics.median(decoder["distseq"]) * tokens_per_step
    plain_tokens = statistics.median(decoder["plain"]) * tokens_per_step
    log(f"  decoder on mqar (seq {DECODER['seq_len']}): distseq {ours_tokens:,.0f} tokens/s, plain loop "
        f"{plain_tokens:,.0f} tokens/s, ratio {ours_tokens / plain_tokens:.3f}")
    return {"overhead_ratio": ours / plain, "distseq_steps_per_sec": ours, "plain_steps_per_sec": plain,
            "repeats": rates, "steps": steps, "torch_threads": torch.get_num_threads(),
            "config": {"model": "lstm", "hidden_size": 256, "seq_len": 32, "batch": 256, "precision": "fp32",
                       "log_every": LOG_EVERY},
            "decoder_overhead_ratio": ours_tokens / plain_tokens, "decoder_distseq_tokens_per_sec": ours_tokens,
            "decoder_plain_tokens_per_sec": plain_tokens, "decoder_repeats": decoder, "decoder_steps": decoder_steps,
            "decoder_config": {**DECODER, "model": "decoder", "precision": "fp32", "log_every": LOG_EVERY}}


def profile_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    """One profiled ``distseq train`` of the overhead config: the share of step time per phase."""
    from distseq.training.loop import train

    steps, window = (6, "2:6") if quick else (100, "20:70")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = overhead_config(steps, tmp)
        cfg.log.profile_steps = window
        profile = train(cfg)["profile"]
    return {"step_time_shares": profile["step_time_shares"], "step_ms": profile["step_ms"],
            "profiled_steps": profile["steps"], "top_operators": profile["top_operators"]}
