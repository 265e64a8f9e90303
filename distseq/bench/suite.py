"""One benchmark suite in a process of its own:
``python -m distseq.bench.suite NAME OUT_DIR [--quick] [--backend local|slurm]``.

A fresh process per suite keeps the suites from disturbing one another (threads, allocator, the
accelerate state) and makes its peak resident memory its own. Writes ``OUT_DIR/NAME.json``.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from distseq.errors import DistseqError
from distseq.fsio import write_json
from distseq.training.metrics import peak_memory

from .accuracy import accuracy_suite
from .checkpoint import checkpoint_suite
from .files import files_suite
from .mixers import mixer_speed_suite
from .overhead import overhead_suite, profile_suite
from .precision import precision_suite
from .recall import recall_suite
from .scaling import scaling_suite
from .speed import speed_suite
from .startup import startup_suite
from .stream import stream_suite
from .sweep import sweep_suite
from .tokens import tokens_suite
from .zoology import zoology_suite

SUITES = {
    "overhead": overhead_suite,
    "scaling": scaling_suite,
    "stream": stream_suite,
    "files": files_suite,
    "accuracy": accuracy_suite,
    "precision": precision_suite,
    "profile": profile_suite,
    "recall": recall_suite,
    "checkpoint": checkpoint_suite,
    "startup": startup_suite,
    "sweep": sweep_suite,
    "mixers": mixer_speed_suite,
    "tokens": tokens_suite,
    "speed": speed_suite,
    "zoology": zoology_suite,
}
WRITES_FILES = ("zoology",)  # suites that write more than their JSON into OUT (and may resume from it)


def main(argv=None) -> int:
    name, out_dir, *flags = argv if argv is not None else sys.argv[1:]
    own = {}
    if name in WRITES_FILES:
        backend = flags[flags.index("--backend") + 1] if "--backend" in flags else "local"
        own = {"out": Path(out_dir), "backend": backend}
    try:
        result = SUITES[name](quick="--quick" in flags, log=lambda line: print(line, flush=True), **own)
    except DistseqError as error:  # a suite's refusal (a sweep dir holding another plan) is one line
        print(f"distseq bench: {name}: error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    memory = peak_memory()
    # the largest of this process and every process it started (torchrun ranks, the plain script)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["peak_rss_mb"] = max(memory["peak_rss_mb"], children)
    if "peak_cuda_memory_mb" in memory:
        result["peak_cuda_memory_mb"] = memory["peak_cuda_memory_mb"]
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # run on its own, OUT need not exist yet
    write_json(Path(out_dir) / f"{name}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
