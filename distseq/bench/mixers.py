"""The mixers suite: training tokens/s of each sequence mixer against attention, and their memory.

Every model is the mqar preset's (2 layers, width 64, vocab 128) with its own mixer, trained in a plain
loop (forward, backward, AdamW step) on the same batches: 8,192 tokens a step, as 32 sequences of 256 or
4 of 2,048. The models take turns, three rounds, and each keeps its best round, so a busy moment of a
shared machine does not land on one model alone. ``speed_vs_attention`` is a mixer's tokens/s over the
decoder's (full causal attention) at the same sequence length, measured in the same run.

Memory: the bytes autograd saves for the backward pass in one forward at seq 2,048 (the activations; the
weights are the same few hundred kB for every model), counted by ``saved_tensors_hooks`` over distinct
storages, so it is a property of the model and not of the allocator; and the peak resident memory of a
fresh process that trains the model for two steps at seq 2,048 (on a GPU, the peak allocated memory).
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

MODELS = ("decoder", "sliding-window", "based", "hyena", "mamba")
SEQ_LENS = (256, 2048)
TOKENS_PER_STEP = 8192
WIDTH, LAYERS = 64, 2
ROUNDS, STEPS = 3, 3
QUICK = {"seq_lens": (32, 64), "tokens": 256, "rounds": 1, "steps": 1}


def build(kind: str, seq_len: int, device: torch.device) -> Tuple[torch.nn.Module, int]:
    """The mqar preset's model of ``kind`` at this sequence length, and the vocabulary size."""
    from distseq.config import from_sources
    from distseq.models import build_model
    from distseq.registry import TASKS

    overrides = {"model": {"kind": kind, "hidden_size": WIDTH, "num_layers": LAYERS},
                 "data": {"seq_len": seq_len, "num_kv_pairs": max(2, seq_len // 16)}}
    cfg = from_sources("mqar", overrides, "the mixers bench")
    torch.manual_seed(0)
    return build_model(cfg.model, TASKS[cfg.data.task], cfg.task_spec()).to(device), cfg.data.vocab_size


def timed_steps(model, batch: torch.Tensor, steps: int) -> float:
    """Seconds per training step (forward, loss, backward, AdamW step) after one warm-up step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        logits = model(batch)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    _sync(batch.device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(batch.device)
    return (time.perf_counter() - started) / steps


def saved_activation_bytes(model, batch: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one forward (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(batch).sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


# a fresh process: build the model, two training steps at this length, print its peak resident memory (MB)
# (VmHWM: the kernel keeps ru_maxrss across exec, so a child started by a large parent would report the parent's)
PEAK_SCRIPT = """
import sys, torch
from distseq.bench.mixers import build, timed_steps
kind, seq_len, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if kind != "-":  # "-": the imports alone, the baseline every process pays
    model, vocab = build(kind, seq_len, torch.device("cpu"))
    timed_steps(model, torch.randint(0, vocab, (batch, seq_len)), 1)
try:
    print(int([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]) / 1024)
except OSError:  # no /proc (macOS): ru_maxrss, in bytes there
    import resource
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def peak_rss_mb(kind: str, seq_len: int, batch: int) -> float:
    """Peak resident memory (MB) of a fresh CPU process training ``kind`` for two steps."""
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, kind, str(seq_len), str(batch)], capture_output=True,
                          text=True, check=True)
    return float(done.stdout.split()[-1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mixer_speed_suite(quick: bool = False, log: Callable[[str], None] = print) -> Dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq_lens = QUICK["seq_lens"] if quick else SEQ_LENS
    tokens = QUICK["tokens"] if quick else TOKENS_PER_STEP
    rounds, steps = (QUICK["rounds"], QUICK["steps"]) if quick else (ROUNDS, STEPS)
    rows: List[dict] = []
    for seq_len in seq_lens:
        models = {kind: build(kind, seq_len, device) for kind in MODELS}
        vocab = next(iter(models.values()))[1]
        batch = torch.randint(0, vocab, (max(1, tokens // seq_len), seq_len),
                              generator=torch.Generator().manual_seed(seq_len)).to(device)
        best = {kind: float("inf") for kind in MODELS}
        for _ in range(rounds):
            for kind, (model, _) in models.items():
                best[kind] = min(best[kind], timed_steps(model, batch, steps))
        for kind, (model, _) in models.items():
            row = {"model": kind, "seq_len": seq_len, "batch": batch.shape[0],
                   "tokens_per_sec": batch.numel() / best[kind],
                   "speed_vs_attention": best["decoder"] / best[kind]}
            if seq_len == seq_lens[-1]:
                row["activation_mb"] = saved_activation_bytes(model, batch) / 2**20
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    timed_steps(model, batch, 1)
                    row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                else:
                    row["peak_rss_mb"] = peak_rss_mb(kind, seq_len, batch.shape[0])
            rows.append(row)
            memory = (f", activations {row['activation_mb']:.0f} MB, peak "
                      f"{row.get('peak_rss_mb', row.get('peak_cuda_mb', 0)):.0f} MB") if "activation_mb" in row else ""
            log(f"  {kind:<15} seq {seq_len:>5}: {row['tokens_per_sec']:>9.0f} tokens/s, "
                f"{row['speed_vs_attention']:.2f}x attention{memory}")
    result = {"mixer_speed_table": rows, "width": WIDTH, "layers": LAYERS, "tokens_per_step": tokens,
              "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cpu":
        result["process_baseline_mb"] = peak_rss_mb("-", seq_lens[-1], 1)
        log(f"  a process's own peak before any model (imports): {result['process_baseline_mb']:.0f} MB")
    return result


def speed_table_markdown(rows: List[dict]) -> str:
    seq_lens = sorted({r["seq_len"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    cell = {(r["model"], r["seq_len"]): r for r in rows}
    header = ["model", *(f"tokens/s at seq {t} (vs attention)" for t in seq_lens), f"activations at seq {seq_lens[-1]}",
              f"peak memory at seq {seq_lens[-1]}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        speeds = [f"{cell[(model, t)]['tokens_per_sec']:,.0f} ({cell[(model, t)]['speed_vs_attention']:.2f}x)"
                  for t in seq_lens]
        last = cell[(model, seq_lens[-1])]
        peak = last.get("peak_rss_mb", last.get("peak_cuda_mb"))
        memory = [f"{last['activation_mb']:,.0f} MB" if "activation_mb" in last else "-",
                  "-" if peak is None else f"{peak:,.0f} MB"]
        lines.append("| " + " | ".join([model, *speeds, *memory]) + " |")
    return "\n".join(lines)
