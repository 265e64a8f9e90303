"""``distseq bench``: ratios measured in one run on this machine, a table, ``bench.json`` and a report.

Every figure compares distseq with a raw reference measured in the same invocation (a plain PyTorch
loop, one process, raw ``torch.randn``, raw pyarrow, the original example's script), so a shared or noisy machine
moves both sides. Each suite runs in a process of its own (``suite.py``); this module runs them in
order, collects the headline keys into ``OUT/bench.json`` and writes the report (``report.py``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from tqdm.auto import tqdm

from distseq.errors import DistseqError
from distseq.fsio import write_json

from .report import GOALS  # re-exported: the goals live with the report that judges them

SUITE_NAMES = ("overhead", "scaling", "stream", "files", "accuracy", "precision", "profile", "recall", "checkpoint",
               "startup", "sweep", "mixers", "tokens", "speed")
ON_REQUEST = ("zoology",)  # run only when named: longer than all the others together
BACKENDS = ("local", "slurm")  # where the zoology suite's sweep runs

# what each suite contributes to the top level of bench.json
HEADLINES = {
    "overhead": ("overhead_ratio", "decoder_overhead_ratio"),
    "scaling": ("scaling_2proc", "scaling_efficiency"),
    "stream": ("stream_ratio", "seek_ratio", "token_stream_ratio", "token_stream_seq_len"),
    "files": ("files_ratio", "files_seek_ratio", "files_index_seconds", "files_index_mb"),
    "accuracy": ("time_to_99_s", "seed_recipe_seconds", "seed_recipe_accuracy"),
    "precision": ("precision_table",),
    "profile": ("step_time_shares",),
    "recall": ("induction_accuracy_2_layers", "induction_accuracy_1_layer", "mqar_table"),
    "checkpoint": ("async_block_ratio", "save_mb_per_s", "load_mb_per_s", "reshard_load_seconds"),
    "startup": ("startup_seconds",),
    "sweep": ("sweep_overhead_s_per_point", "sweep_pool_ratio"),
    "mixers": ("mixer_speed_table",),
    "tokens": ("lm_files_ratio", "lm_index_seconds", "generation_cache_speedup"),
    "speed": ("compile_ratio_decoder", "compile_vs_plain_decoder", "compile_seconds_decoder", "compile_ratio_lstm",
              "compile_vs_plain_lstm", "compile_seconds_lstm", "ac_full_memory_cut", "ac_full_tokens_cost",
              "ac_selective_memory_cut", "ac_selective_tokens_cost"),
    "zoology": ("zoology_table",),
}


class BenchError(DistseqError):
    """A suite failed; the message names it (exit 1)."""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# the vector-ISA flags of /proc/cpuinfo that decide which kernels ATen and inductor pick
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def cpu_flags() -> List[str]:
    """This CPU's flags among ``ISA_FLAGS``, in that order ([] without /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    present = set(line.split(":", 1)[-1].split())
    return [flag for flag in ISA_FLAGS if flag in present]


def machine() -> Dict:
    import accelerate
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU: {cpu_name()}"
    return {"cpu_count": os.cpu_count(), "device": device, "torch": torch.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def goal_met(key: str, value) -> bool:
    comparison, goal = GOALS[key]
    return value >= goal if comparison == ">=" else value <= goal


def collect(results: Dict[str, dict], quick: bool) -> Dict:
    bench: Dict = {"quick": quick, "suites_run": list(results), "machine": machine()}
    for name, result in results.items():
        for key in HEADLINES[name]:
            bench[key] = result[key]
    bench["goals"] = {key: {"comparison": comparison, "goal": goal, "met": goal_met(key, bench[key])}
                      for key, (comparison, goal) in GOALS.items() if key in bench}
    bench["peak_rss_mb"] = {name: result["peak_rss_mb"] for name, result in results.items()}
    cuda = {name: result["peak_cuda_memory_mb"] for name, result in results.items() if "peak_cuda_memory_mb" in result}
    if cuda:
        bench["peak_cuda_memory_mb"] = cuda
    bench["suites"] = results
    return bench


def run_bench(out_dir: str, suites: Sequence[str], quick: bool, log: Callable[[str], None] = print,
              backend: str = "local") -> Dict:
    """Run ``suites`` one process each, then write bench.json, the table and the report."""
    from .report import summary_table, write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in tqdm(suites, desc="bench", unit="suite"):
        log(f"distseq bench: {name}{' (quick)' if quick else ''}")
        command = [sys.executable, "-m", "distseq.bench.suite", name, str(out), "--backend", backend] + (
            ["--quick"] if quick else [])
        returncode = subprocess.run(command).returncode
        if returncode != 0:
            raise BenchError(f"suite {name!r} failed (exit {returncode}); its output is above")
        results[name] = json.loads((out / f"{name}.json").read_text())
    bench = collect(results, quick)
    write_json(out / "bench.json", bench)
    log(summary_table(bench))
    write_report(out, bench, log)
    return bench
