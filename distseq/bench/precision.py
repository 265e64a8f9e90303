"""The precision suite: which model kind runs under which precision on this device, and how fast.

The probe of ``distseq probe`` (one forward+backward per step, no optimizer) at the overhead config's
size (hidden 256, seq 32, batch 256), for every model kind. ``--quick`` probes every kind and precision
the same way at a small size (hidden 32, seq 16, batch 16, one timed step): the plumbing, not the figures.
"""

from __future__ import annotations

from typing import Callable, Dict

from distseq.distributed.accelerator import local_device, set_cpu_threads
from distseq.training.precision import format_probe, probe_table

from .overhead import overhead_config

QUICK = {"hidden_size": 32, "seq_len": 16, "batch": 16, "repeats": 1}


def precision_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    set_cpu_threads()
    device = local_device()
    cfg = overhead_config(1, "unused")
    repeats = 10
    if quick:  # every kind x precision still runs its warm-up step (the check) and a timed one
        cfg.model.hidden_size, cfg.data.seq_len = QUICK["hidden_size"], QUICK["seq_len"]
        cfg.train.global_batch_size, repeats = QUICK["batch"], QUICK["repeats"]
    rows = probe_table(cfg, device, repeats=repeats)
    for row in rows:
        row["steps_per_sec"] = 1000.0 / row["ms_per_step"] if row["works"] else None
    log(format_probe(rows, device))
    return {"precision_table": rows, "device": str(device), "hidden_size": cfg.model.hidden_size,
            "seq_len": cfg.data.seq_len, "batch": cfg.train.global_batch_size, "repeats": repeats}
