"""Precision: probe the real model on the real device before training; never a silent no-op.

accelerate accepts ``mixed_precision="fp16"`` on a CPU and does nothing, and some kernels fail under
autocast only on some machines (CPU ``nn.LSTM`` under fp16 always; under bf16 where the CPU lacks
native bf16). So every request is checked with one forward+backward under the autocast it asks for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from distseq.config import ModelConfig, TrainConfig
from distseq.errors import ConfigError
from distseq.models import build_model
from distseq.registry import MODELS, TASKS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # what accelerate is given: "no", "bf16" or "fp16"
    reason: str  # one line for the operator


def _step(model, x, lengths, precision: str, device: torch.device, params: bool = False) -> None:
    """One forward+backward under autocast, or (``params``: FSDP2's policy) with the weights themselves
    in the precision's dtype, as FSDP all-gathers them."""
    if params and precision != "no":
        from distseq.distributed.sharding import as_fsdp_computes

        as_fsdp_computes(model, DTYPES[precision])(x, lengths).sum().backward()
        return
    with torch.autocast(device.type, dtype=DTYPES.get(precision, torch.float32), enabled=precision != "no"):
        loss = model(x, lengths).float().sum()
    loss.backward()


def _inputs(cfg: TrainConfig, batch: int, device: torch.device):
    task, spec = TASKS[cfg.data.task], cfg.task_spec()
    x = task.example_input(batch, spec, device)  # (B, T, F) features or (B, T) token ids
    lengths = torch.full((batch,), spec.seq_len, dtype=torch.int64) if spec.variable else None
    return x, lengths


def runs_under(precision: str, cfg: TrainConfig, device: torch.device, model: Optional[nn.Module] = None,
               params: bool = False) -> str:
    """One forward+backward of ``model`` (default: the configured one, built here) under ``precision``;
    '' if it works, else the error. The run's own model is probed without a trace: its gradients are
    cleared and the random state (inputs, dropout) is restored, so training starts exactly as unprobed."""
    model = (model if model is not None else build_model(cfg.model, TASKS[cfg.data.task], cfg.task_spec())).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            _step(model, *_inputs(cfg, 2, device), precision, device, params)
        except RuntimeError as error:
            return str(error).splitlines()[0]
        finally:
            model.zero_grad(set_to_none=True)
    return ""


def cpu_has_native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(requested: str, cfg: TrainConfig, device: torch.device,
                      model: Optional[nn.Module] = None, sharded: bool = False) -> Precision:
    """Turn --precision into what actually runs, or raise a ConfigError naming the alternatives.
    ``model`` is the run's model (probed as it is); absent, the configured one is built. ``sharded``:
    the model will run under FSDP2's policy (bf16 weights, no fp16), so that is what is probed."""
    if requested == "no":
        return Precision("no", "fp32 as requested")
    cpu = device.type == "cpu"
    if requested == "auto":
        if cpu:
            if not cpu_has_native_bf16():
                return Precision("no", "auto on CPU: fp32 (this CPU has no native bf16)")
            error = runs_under("bf16", cfg, device, model, sharded)
            if error:
                return Precision("no", f"auto on CPU: fp32 ({cfg.model.kind} fails under bf16: {error})")
            return Precision("bf16", "auto on CPU: bf16 (native bf16; probed forward+backward works)")
        for candidate in (["bf16"] if torch.cuda.is_bf16_supported() else []) + ([] if sharded else ["fp16"]):
            if not runs_under(candidate, cfg, device, model, sharded):
                return Precision(candidate, f"auto on {device.type}: {candidate} (probed forward+backward works)")
        return Precision("no", f"auto on {device.type}: fp32 (no autocast precision ran {cfg.model.kind})")
    if requested == "fp16" and cpu:
        raise ConfigError("--precision", "fp16 does not run on CPU (accelerate would ignore it); "
                                         "choose --precision no or bf16")
    if requested == "bf16" and not cpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision", "bf16 is not supported by this GPU; choose --precision no or fp16")
    error = runs_under(requested, cfg, device, model, sharded)
    if error:
        other = "bf16" if requested == "fp16" and not cpu else "no"
        raise ConfigError("--precision", f"{requested} fails for --model {cfg.model.kind} on {device.type} ({error}); "
                                         f"choose --precision {other}" + (" or no" if other != "no" else ""))
    return Precision(requested, f"{requested} as requested (probed forward+backward works)")


def probe_table(cfg: TrainConfig, device: torch.device, kinds=None, repeats: int = 10) -> List[dict]:
    """Each model kind (default: every registered one) x precision on ``device``: works or the error,
    and ms per forward+backward."""
    kinds = list(MODELS) if kinds is None else kinds
    batch = cfg.train.global_batch_size
    rows = []
    for kind in kinds:
        for precision in ("no", "bf16", "fp16"):
            row = {"model": kind, "precision": precision, "works": False, "ms_per_step": None, "error": ""}
            # the configured model exactly as it trains; the other kinds at its width and depth
            model_cfg = cfg.model if kind == cfg.model.kind else ModelConfig(
                kind=kind, hidden_size=cfg.model.hidden_size, num_layers=cfg.model.num_layers)
            probe_cfg = TrainConfig(data=cfg.data, model=model_cfg)
            if precision == "fp16" and device.type == "cpu":
                row["error"] = "not on CPU (accelerate ignores fp16 there)"
                rows.append(row)
                continue
            try:
                model = build_model(probe_cfg.model, TASKS[cfg.data.task], cfg.task_spec()).to(device)
                x, lengths = _inputs(cfg, batch, device)
                _step(model, x, lengths, precision, device)  # warm-up, and the check itself
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(repeats):
                    _step(model, x, lengths, precision, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row.update(works=True, ms_per_step=1000 * (time.perf_counter() - started) / repeats)
            except (RuntimeError, AssertionError, ValueError) as error:  # a shape this kind cannot take, memory
                row["error"] = (str(error).splitlines() or [type(error).__name__])[0][:120]
            rows.append(row)
    return rows


def format_probe(rows: List[dict], device: torch.device) -> str:
    lines = [f"precision probe on {device} (forward+backward, ms per step)",
             f"{'model':<11} {'precision':<9} {'result':<8} {'ms':>8}  note"]
    for r in rows:
        ms = f"{r['ms_per_step']:8.2f}" if r["works"] else f"{'-':>8}"
        lines.append(f"{r['model']:<11} {r['precision']:<9} {'works' if r['works'] else 'error':<8} {ms}  {r['error']}")
    return "\n".join(lines)
