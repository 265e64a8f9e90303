"""The zoology suite: Zoology's MQAR comparison (Arora et al. 2023, figure 2) at a CPU's scale.

Every (model, width, cell, learning rate) is one point of a sweep (``distseq sweep``): a normal run dir
under ``OUT/zoology-sweep/``, trained until ``--stop-at eval/accuracy>=0.99`` or its step budget. So the
suite resumes (run it again with the same ``--out``: complete points are not touched, interrupted ones
resume), and ``--backend slurm`` sends the points to a SLURM job array (run the suite again when the
array has ended to build the table). As Zoology does, each (model, width, cell) keeps its best learning
rate; a point's score is its best held-out accuracy (per query).

It writes ``OUT/zoology.json`` (through the suite runner), ``OUT/zoology.md`` (the table),
``OUT/zoology_width.png`` (accuracy against width, one panel per cell, one line per model, as figure 2)
and ``OUT/zoology_state.png`` (accuracy against the recurrent state size per layer).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import yaml

from distseq.fsio import write_text_atomically
from distseq.plotting import pyplot

MODELS = ("decoder", "based", "hyena", "mamba", "sliding-window", "lstm")
LABELS = {"decoder": "attention"}  # Zoology's names where ours differ
# Zoology puts a short convolution in front of every mixer (its BaseConv, 3 taps); Based, Hyena and Mamba-2
# have one by design, attention and the window take it as an option; the LSTM is not one of Zoology's models
MODEL_OPTIONS = {"decoder": {"short-conv": 3}, "sliding-window": {"short-conv": 3}}
WIDTHS = (32, 64, 128)
CELLS = ((64, 4), (128, 8))  # (sequence length, key-value pairs): Zoology's two smallest
LRS = (3e-3, 1e-2)
TARGET = 0.99
# the mqar preset (2 layers, vocab 128) with these: batch 64, at most 350 steps, evaluated every 50 on 512
# held-out sequences, stopping at the target
OPTIONS = {"global-batch-size": 64, "max-steps": 350, "eval-every": 50, "eval-size": 512, "warmup-steps": 50,
           "stop-at": f"eval/accuracy>={TARGET}", "checkpoint-every": 100, "keep-last": 1, "log-with": "none",
           "precision": "no", "log-every": 50}
QUICK = {"models": ("decoder", "mamba"), "widths": (16,), "cells": ((16, 2),), "lrs": (3e-3,),
         "options": {**OPTIONS, "max-steps": 4, "eval-every": 2, "eval-size": 32, "global-batch-size": 8,
                     "checkpoint-every": 2, "vocab-size": 32}}
SWEEP_DIR = "zoology-sweep"


def plan(quick: bool) -> Dict:
    if quick:
        return QUICK
    return {"models": MODELS, "widths": WIDTHS, "cells": CELLS, "lrs": LRS, "options": OPTIONS}


def sweep_file(quick: bool, backend: str = "local") -> Dict:
    """The sweep: the mqar preset with the plan's options; one point per model x width x cell x lr."""
    p = plan(quick)
    points = [{"model": model, **MODEL_OPTIONS.get(model, {}), "hidden-size": width, "seq-len": seq_len,
               "num-kv-pairs": pairs, "lr": lr}
              for (seq_len, pairs) in p["cells"] for width in p["widths"] for model in p["models"] for lr in p["lrs"]]
    return {"base": {"preset": "mqar", "options": dict(p["options"])}, "points": points, "backend": backend,
            "threads": 1}


def zoology_suite(quick: bool = False, log: Callable[[str], None] = print, out: Optional[Path] = None,
                  backend: str = "local") -> Dict:
    from distseq.sweep.runner import run_sweep

    out = Path(out) if out is not None else Path("bench-out")
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "zoology-sweep.yaml"
    write_text_atomically(spec, yaml.safe_dump(sweep_file(quick, backend), sort_keys=False))
    started = time.perf_counter()
    code = run_sweep(str(spec), str(out / SWEEP_DIR))
    seconds = time.perf_counter() - started
    cells = best_cells(out / SWEEP_DIR)
    result = {"zoology_table": cells, "sweep_exit_code": code, "sweep_dir": str(out / SWEEP_DIR),
              "seconds": seconds, "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan(quick).items()},
              "complete": all(c["complete"] for c in cells)}
    table = table_markdown(cells)
    write_text_atomically(out / "zoology.md", table + "\n")
    log(table)
    result["plots"] = write_plots(out, cells)
    return result


def best_cells(sweep_dir: Path) -> List[dict]:
    """One row per (model, width, cell): the best learning rate's best held-out accuracy, with its state size,
    parameters and the step where it reached the target."""
    from distseq.sweep.layout import points_of, read_manifest
    from distseq.sweep.results import parse_condition, read_point

    manifest = read_manifest(sweep_dir)
    target = parse_condition(f"eval/accuracy>={TARGET}")
    groups: Dict[Tuple, list] = {}
    for point in points_of(manifest):
        result = read_point(sweep_dir, point, target)
        o = point.overrides
        groups.setdefault((o["model"], o["hidden_size"], o["seq_len"], o["num_kv_pairs"]), []).append(result)
    rows = []
    for (model, width, seq_len, pairs), results in groups.items():
        scored = [r for r in results if r.complete and r.score("eval/accuracy") is not None]
        best = max(scored, key=lambda r: r.score("eval/accuracy"), default=None)
        rows.append({"model": model, "width": width, "seq_len": seq_len, "num_kv_pairs": pairs,
                     "accuracy": best.score("eval/accuracy") if best else None,
                     "lr": best.overrides["lr"] if best else None,
                     "reached_at_step": best.reached_at_step if best else None,
                     "steps": best.steps if best else None, "state_size": best.state_size if best else None,
                     "parameters": best.parameters if best else None,
                     "train_seconds": sum(r.train_seconds or 0.0 for r in results),
                     "complete": len(scored) == len(results)})
    return rows


def table_markdown(rows: List[dict]) -> str:
    """Accuracy per model (rows) and cell x width (columns); the state size per layer beside each model."""
    cells = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})
    widths = sorted({r["width"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    by_key = {(r["model"], r["seq_len"], r["num_kv_pairs"], r["width"]): r for r in rows}
    header = ["model"] + [f"seq {t}, {m} pairs, width {w}" for t, m in cells for w in widths]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        values = []
        for t, m in cells:
            for w in widths:
                row = by_key.get((model, t, m, w))
                values.append("-" if row is None or row["accuracy"] is None else
                              f"{row['accuracy']:.3f}" + ("" if row["complete"] else " (partial)"))
        lines.append("| " + " | ".join([LABELS.get(model, model), *values]) + " |")
    return "\n".join(lines)


def write_plots(out: Path, rows: List[dict]) -> Optional[List[str]]:
    """Accuracy against width and against state size, one panel per cell; None without matplotlib."""
    plt = pyplot()
    if plt is None or not rows:
        return None
    written = []
    for name, x_key, x_label in (("zoology_width.png", "width", "model width"),
                                 ("zoology_state.png", "state_size", "recurrent state per layer (numbers)")):
        _draw(plt, rows, x_key, x_label, out / name)
        written.append(name)
    return written


def _draw(plt, rows: List[dict], x_key: str, x_label: str, path: Path) -> None:
    cells = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), sharey=True, squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for ax, (seq_len, pairs) in zip(axes[0], cells):
        for model in models:
            line = sorted((r[x_key], r["accuracy"]) for r in rows if r["model"] == model and r["seq_len"] == seq_len
                          and r["num_kv_pairs"] == pairs and r["accuracy"] is not None and r[x_key] is not None)
            if line:
                ax.plot([x for x, _ in line], [y for _, y in line], marker="o", label=LABELS.get(model, model))
        ax.set_xscale("log", base=2)
        if x_key == "width":
            widths = sorted({r["width"] for r in rows})
            ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_title(f"seq {seq_len}, {pairs} pairs")
        ax.set_xlabel(x_label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (held out, per query)")
    axes[0][0].legend(fontsize=8, loc="center left")  # the first panel keeps its middle left free
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
