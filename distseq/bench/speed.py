"""The speed suite: ``--compile`` against eager training, and what ``--activation-checkpointing`` costs and saves.
Compile: on the overhead suite's two workloads (the causal decoder, 2 layers of width 64, on mqar at seq 256, batch
32; the LSTM of hidden 256 on sum-sign at seq 32, batch 256), in one process, same model, stream and recipe, three
sides take turns, their order rotating repeat by repeat so the machine's noise falls on all of them: ``distseq train
--compile``, eager ``distseq train`` and the overhead suite's hand-written eager loop. Throughput is training
tokens/s (summary.json's, which leaves out the compile warm-up before step 1), median over repeats:
``compile_ratio_*`` = compiled / eager distseq, ``compile_vs_plain_*`` = compiled distseq / the plain loop; each
side's best repeat and the spread of its repeats are kept too (a busy 2-core machine can slow one repeat
several-fold, and the suite says so). ``compile_seconds_*`` is the first compiled run's compile phase (summary.json
``compile.seconds``; dynamo traces from scratch, inductor's on-disk cache may be warm: its hits and misses are
recorded, with the ops and graphs dynamo captured and what it left to eager, and why). Activation checkpointing: the
decoder, 4 layers of width 128, at seq 2,048, batch 4, trained by ``python -m distseq.cli train`` in a fresh process
per mode (none, full, selective; alternating, repeat by repeat), with a hook on the training step that takes the
resident memory just before the first step, resets the kernel's high-water mark there (``/proc/self/clear_refs``)
and reads it after each step: the training peak above that baseline (imports, model, data pipeline), in MB. glibc is
told to unmap freed tensors at once (a fixed ``MALLOC_MMAP_THRESHOLD_``), so the resident peak follows the live
tensors rather than the allocator's cache, in every mode alike (as do the page faults this costs, in their
tokens/s). On a GPU it is ``torch.cuda.max_memory_allocated`` above the memory allocated before the first step.
summary.json's ``peak_rss_mb`` is not used: it is ``ru_maxrss``, which the kernel carries across exec from the
process that started this one. ``ac_*_memory_cut`` = 1 - peak(mode) / peak(none) and ``ac_*_tokens_cost`` = 1 -
tokens/s(mode) / tokens/s(none), medians over repeats. Full checkpointing still holds one block's activations while
it recomputes it, and the logits and loss (vocab 512) stay outside the blocks: on the compile comparison's decoder
(2 layers of width 64) the logits are most of the memory and the cut was 0.37 (120 to 76 MB) for 0.26 of the
tokens/s, which is why the deeper decoder is measured. ``--quick``: one repeat of a few steps of each compile
comparison, compiled with the aot_eager backend (dynamo's graphs run eagerly: seconds to compile, where inductor
takes a minute on a cold cache), and the three modes on the 2 x 64 decoder at batch 2 for two steps: the plumbing,
not the figures.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .overhead import DECODER, decoder_config, overhead_config, plain_loop_steps_per_sec

SIDES = ("compiled", "eager", "plain")
WORKLOADS = {"decoder": decoder_config, "lstm": overhead_config}
STEPS = {"decoder": 12, "lstm": 6}
QUICK_STEPS = {"decoder": 3, "lstm": 2}
REPEATS = 5
NOISY = 1.5  # a side whose fastest repeat is this much faster than its slowest: the machine was busy
MODES = ("none", "full", "selective")
# a decoder deep and wide enough that its blocks' activations, not the logits (vocab 512), are the memory
AC = {"seq_len": 2048, "batch": 4, "steps": 6, "repeats": 3, "num_layers": 4, "hidden_size": 128}
AC_QUICK = {"seq_len": 2048, "batch": 2, "steps": 2, "repeats": 1, "num_layers": 2, "hidden_size": 64}
MMAP_THRESHOLD = 128 * 1024  # bytes: larger allocations are mapped, and unmapped when freed
DYNAMO_COUNTERS = ("frames", "stats", "inductor", "unimplemented", "graph_break")


def tokens_per_step(cfg) -> int:
    return cfg.train.global_batch_size * cfg.data.seq_len


def run_side(side: str, make_config: Callable, steps: int, run_dir: str, backend: str = "inductor"
             ) -> Tuple[float, Optional[dict]]:
    """Training tokens/s of one side, and the compiled run's ``compile`` report."""
    from distseq.training.loop import train

    cfg = make_config(steps, run_dir)
    if side == "plain":
        return plain_loop_steps_per_sec(cfg) * tokens_per_step(cfg), None
    cfg.train.compile = side == "compiled"
    cfg.train.compile_backend = backend if cfg.train.compile else "inductor"
    out = train(cfg)
    return out["tokens_per_sec"], out.get("compile")


def dynamo_counts() -> Dict[str, Dict[str, int]]:
    from torch._dynamo.utils import counters

    return {name: dict(counters[name]) for name in DYNAMO_COUNTERS}


def dynamo_report(before: Dict, after: Dict) -> Dict:
    """What dynamo did between two snapshots of its counters: frames, ops and graphs captured, inductor's
    cache, and why it left code to eager (the first lines of each reason)."""
    def grew(name: str, key: str) -> int:
        return after[name].get(key, 0) - before[name].get(key, 0)

    reasons = [key for name in ("unimplemented", "graph_break") for key in after[name] if grew(name, key) > 0]
    short = [": ".join([line.strip() for line in reason.splitlines() if line.strip()][:2]).rstrip(".")
             for reason in reasons]
    return {"frames_total": grew("frames", "total"), "frames_ok": grew("frames", "ok"),
            "ops_captured": grew("stats", "calls_captured"), "graphs": grew("stats", "unique_graphs"),
            "fxgraph_cache_hits": grew("inductor", "fxgraph_cache_hit"),
            "fxgraph_cache_misses": grew("inductor", "fxgraph_cache_miss"), "left_to_eager": short}


def compile_comparison(name: str, steps: int, repeats: int, log: Callable[[str], None], backend: str = "inductor"
                       ) -> Dict:
    """The three sides of ``name``'s workload, the order rotating each repeat."""
    make_config = WORKLOADS[name]
    rates: Dict[str, List[float]] = {side: [] for side in SIDES}
    compiles: List[dict] = []
    dynamo: Dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        plain_loop_steps_per_sec(make_config(2, f"{tmp}/warmup"))  # first-use costs land on no side
        for repeat in range(repeats):
            for side in SIDES[repeat % 3:] + SIDES[:repeat % 3]:
                before = dynamo_counts() if side == "compiled" and not compiles else None
                tps, compiled = run_side(side, make_config, steps, f"{tmp}/{side}-{repeat}", backend)
                rates[side].append(tps)
                if compiled is not None:
                    compiles.append(compiled)
                if before is not None:
                    dynamo = dynamo_report(before, dynamo_counts())
            log(f"  {name} repeat {repeat + 1}/{repeats}: " + ", ".join(
                f"{side} {rates[side][-1]:,.0f}" for side in SIDES) + " tokens/s")
    median = {side: statistics.median(values) for side, values in rates.items()}
    best = {side: max(values) for side, values in rates.items()}
    return {"tokens_per_sec": median, "repeats": rates, "compile": compiles, "dynamo": dynamo, "steps": steps,
            "backend": backend,
            "compile_ratio": median["compiled"] / median["eager"],
            "compile_vs_plain": median["compiled"] / median["plain"], "compile_seconds": compiles[0]["seconds"],
            "best_tokens_per_sec": best, "compile_ratio_best": best["compiled"] / best["eager"],
            "compile_vs_plain_best": best["compiled"] / best["plain"], "spread": spread(rates)}


def spread(rates: Dict[str, List[float]]) -> float:
    """The largest fastest / slowest repeat of one side: near 1 on a quiet machine."""
    return max(max(values) / min(values) for values in rates.values())


def compile_note(name: str, result: Dict) -> str:
    """One line: the figures, and what dynamo left to eager (the reason a compiled run gains nothing)."""
    d = result["dynamo"]
    line = (f"  {name}: compiled {result['tokens_per_sec']['compiled']:,.0f}, eager "
            f"{result['tokens_per_sec']['eager']:,.0f}, plain loop {result['tokens_per_sec']['plain']:,.0f} tokens/s; "
            f"compile_ratio {result['compile_ratio']:.3f}, vs plain {result['compile_vs_plain']:.3f}; first compile "
            f"{result['compile_seconds']:.1f} s (inductor cache: {d['fxgraph_cache_hits']} hit(s), "
            f"{d['fxgraph_cache_misses']} miss(es)); dynamo captured {d['ops_captured']} op(s) in {d['graphs']} "
            f"graph(s)")
    if d["left_to_eager"]:
        line += "; left to eager: " + "; ".join(d["left_to_eager"])
    if result["spread"] > NOISY:
        line += (f"\n  {name}: noisy: one side's repeats differ by up to {result['spread']:.1f}x (a busy machine); "
                 f"their best: compile_ratio {result['compile_ratio_best']:.3f}, vs plain "
                 f"{result['compile_vs_plain_best']:.3f}")
    if any("LSTM" in reason for reason in d["left_to_eager"]):
        line += (f"\n  {name}: dynamo does not trace nn.LSTM (torch._dynamo.config.allow_rnn is False), so the "
                 "recurrence runs eagerly under --compile too: compile cannot speed it up")
    return line


# --- activation checkpointing: one fresh process per mode ------------------------------------------------------
def _status_mb(field: str) -> Optional[float]:
    """``VmRSS`` / ``VmHWM`` of this process in MB (None without /proc)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None


def _reset_resident_peak() -> bool:
    """Set the kernel's high-water mark of resident memory to the current resident memory (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _process_peak_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes there, kB on Linux


class TrainingPeak:
    """Memory just before the first training step, and the peak over the steps from there."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.figures: Dict = {}

    def begin(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.figures = {"measure": "cuda max_memory_allocated above allocated before the first step",
                            "before_first_step_mb": torch.cuda.memory_allocated() / 2**20}
            torch.cuda.reset_peak_memory_stats()
            return
        before = _status_mb("VmRSS")
        if before is not None and _reset_resident_peak():
            self.figures = {"measure": "resident peak over the training steps above resident before the first step",
                            "before_first_step_mb": before}
        else:
            self.figures = {"measure": "process peak resident memory (no high-water mark to reset here)",
                            "before_first_step_mb": before}

    def after_step(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = _status_mb("VmHWM") or _process_peak_mb()
        self.figures["peak_mb"] = peak
        process_peak = self.figures["measure"].startswith("process")
        self.figures["training_peak_mb"] = peak if process_peak else peak - self.figures["before_first_step_mb"]


def measured_train(out: str, argv: List[str]) -> None:
    """``python -m distseq.cli ARGV`` in this fresh process, its training steps' memory written to ``out``."""
    import runpy

    from distseq.fsio import write_json
    from distseq.training import loop

    inner, peak = loop.train_step, TrainingPeak()

    def step(run, micro, done):
        if not peak.figures:
            peak.begin()
        outcome = inner(run, micro, done)
        peak.after_step()
        return outcome

    loop.train_step = step  # run_loop looks it up at each step
    sys.argv = ["distseq", *argv]
    try:
        runpy.run_module("distseq.cli", run_name="__main__", alter_sys=True)
    finally:
        write_json(Path(out), peak.figures)


def ac_run(mode: str, sizes: Dict, tmp: str, tag: str) -> Dict:
    """One fresh ``distseq train`` of the decoder under activation checkpointing ``mode``: memory and tokens/s."""
    cfg = decoder_config(sizes["steps"], f"{tmp}/{tag}")
    cfg.data.seq_len, cfg.train.global_batch_size = sizes["seq_len"], sizes["batch"]
    cfg.model.num_layers, cfg.model.hidden_size = sizes["num_layers"], sizes["hidden_size"]
    cfg.data.block_size = cfg.data.eval_size = sizes["batch"]  # the stream's cache and evaluation stay small
    cfg.train.activation_checkpointing = mode
    config, memory = Path(f"{tmp}/{tag}.json"), Path(f"{tmp}/{tag}-memory.json")
    config.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    command = [sys.executable, "-c", "import sys; from distseq.bench.speed import measured_train; "
               "measured_train(sys.argv[1], sys.argv[2:])", str(memory), "train", "--config", str(config)]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(Path(f"{tmp}/{tag}/summary.json").read_text())
    return {**json.loads(memory.read_text()), "tokens_per_sec": summary["tokens_per_sec"]}


def checkpointing_comparison(sizes: Dict, log: Callable[[str], None]) -> Dict:
    runs: Dict[str, List[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(sizes["repeats"]):
            for mode in MODES[repeat % 3:] + MODES[:repeat % 3]:
                runs[mode].append(ac_run(mode, sizes, tmp, f"{mode}-{repeat}"))
            log(f"  checkpointing repeat {repeat + 1}/{sizes['repeats']}: " + ", ".join(
                f"{mode} {runs[mode][-1]['training_peak_mb']:.0f} MB {runs[mode][-1]['tokens_per_sec']:,.0f} tokens/s"
                for mode in MODES))
    table = [{"mode": mode, "training_peak_mb": statistics.median(r["training_peak_mb"] for r in runs[mode]),
              "before_first_step_mb": statistics.median(r["before_first_step_mb"] or 0.0 for r in runs[mode]),
              "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in runs[mode]),
              "best_tokens_per_sec": max(r["tokens_per_sec"] for r in runs[mode])} for mode in MODES]
    tokens = {mode: [r["tokens_per_sec"] for r in runs[mode]] for mode in MODES}
    return {"table": table, "repeats": runs, "measure": runs["none"][0]["measure"], "spread": spread(tokens)}


def machine_figures() -> Dict:
    """The device, and on CPU what decides the kernels: the vector flags, ATen's and inductor's choice."""
    from distseq.distributed.accelerator import local_device

    from . import cpu_flags, cpu_name

    out = {"device": str(local_device()), "cpu": cpu_name(), "cpu_flags": cpu_flags(),
           "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        out["inductor_vec_isa"] = str(pick_vec_isa()) or "none"
    except Exception:  # an older torch, or no compiler to test the ISA with
        out["inductor_vec_isa"] = None
    return out


def speed_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    from distseq.distributed.accelerator import set_cpu_threads

    set_cpu_threads()  # the thread count train() uses, for the plain loop too
    steps, repeats = (QUICK_STEPS, 1) if quick else (STEPS, REPEATS)
    result: Dict = {"quick": quick, "machine": machine_figures()}
    m = result["machine"]
    log(f"  on {m['device']} ({m['cpu']}, {m['threads']} threads; CPU flags {' '.join(m['cpu_flags']) or '-'}; "
        f"ATen {m['aten_cpu_capability']}, inductor {m['inductor_vec_isa']})")
    for name in WORKLOADS:
        compared = compile_comparison(name, steps[name], repeats, log, "aot_eager" if quick else "inductor")
        log(compile_note(name, compared))
        result[f"compile_{name}"] = compared
        for key in ("compile_ratio", "compile_vs_plain", "compile_seconds"):
            result[f"{key}_{name}"] = compared[key]
    sizes = AC_QUICK if quick else AC
    checkpointing = result["checkpointing"] = {**checkpointing_comparison(sizes, log), "sizes": sizes,
                                               "model": {**DECODER, **sizes, "model": "decoder"}}
    rows = {row["mode"]: row for row in checkpointing["table"]}
    for mode in ("full", "selective"):
        result[f"ac_{mode}_memory_cut"] = 1 - rows[mode]["training_peak_mb"] / rows["none"]["training_peak_mb"]
        result[f"ac_{mode}_tokens_cost"] = 1 - rows[mode]["tokens_per_sec"] / rows["none"]["tokens_per_sec"]
        checkpointing[f"{mode}_tokens_cost_best"] = (
            1 - rows[mode]["best_tokens_per_sec"] / rows["none"]["best_tokens_per_sec"])
    log(f"  checkpointing (decoder {sizes['num_layers']} x {sizes['hidden_size']}, seq {sizes['seq_len']}, batch "
        f"{sizes['batch']}; {checkpointing['measure']}): "
        + ", ".join(f"{mode} {rows[mode]['training_peak_mb']:.0f} MB {rows[mode]['tokens_per_sec']:,.0f} tokens/s"
                    for mode in MODES)
        + f"; full cuts memory {result['ac_full_memory_cut']:.3f} for {result['ac_full_tokens_cost']:.3f} of the "
        f"tokens/s, selective {result['ac_selective_memory_cut']:.3f} for {result['ac_selective_tokens_cost']:.3f}")
    if checkpointing["spread"] > NOISY:
        log(f"  checkpointing: noisy: one mode's repeats differ by up to {checkpointing['spread']:.1f}x in tokens/s; "
            f"their best: full costs {checkpointing['full_tokens_cost_best']:.3f}, selective "
            f"{checkpointing['selective_tokens_cost_best']:.3f}")
    return result

