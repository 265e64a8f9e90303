"""The bench report: a text table always; PNG plots and ``report.md`` embedding them with matplotlib.

matplotlib is the optional ``bench`` extra. Without it the table and ``report.md`` (tables only) are
still written and the message says how to get the plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

from distseq.plotting import plots_hint, pyplot

# headline key -> (comparison, goal): each one a ratio measured in one run
GOALS = {
    "overhead_ratio": (">=", 0.95),
    "decoder_overhead_ratio": (">=", 0.95),
    "scaling_2proc": (">=", 1.7),
    "stream_ratio": (">=", 0.5),
    "seek_ratio": ("<=", 1.1),
    "token_stream_ratio": (">=", 0.5),
    "files_ratio": (">=", 0.5),
    "files_seek_ratio": ("<=", 1.1),
    "files_index_seconds": ("<=", 60),
    "lm_files_ratio": (">=", 0.9),
    "lm_index_seconds": ("<=", 60),
    "async_block_ratio": ("<=", 0.2),
    "sweep_overhead_s_per_point": ("<=", 1.0),
    "sweep_pool_ratio": (">=", 1.7),
    "compile_ratio_decoder": (">=", 1.0),
    "ac_full_memory_cut": (">=", 0.40),
    "ac_full_tokens_cost": ("<=", 0.35),
}

PLOTS_HINT = plots_hint("distseq bench")


def ordered_shares(shares: Dict[str, float]) -> Dict[str, float]:
    """The step's phases in step order (JSON files sort their keys)."""
    from distseq.training.profiling import PHASES

    return {phase: shares[phase] for phase in (*PHASES, "other") if phase in shares}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "not reached"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def headline_rows(bench: Dict) -> List[tuple]:
    """(figure, value, goal, what it compares) for each headline ratio present."""

    rows = []
    described = {
        "overhead_ratio": "distseq train steps/s / plain PyTorch loop (LSTM h256, seq 32, batch 256, fp32)",
        "decoder_overhead_ratio": "distseq train tokens/s / plain PyTorch loop (decoder 2x64, mqar seq 256, batch 32)",
        "scaling_2proc": "samples/s on 2 processes / 1 process (gloo, 1 thread each, same micro-batch)",
        "scaling_efficiency": "scaling_2proc / 2",
        "stream_ratio": "stream samples/s / raw torch.randn (sum-sign, seq 10)",
        "seek_ratio": "first batch at sample 10^12 / at 0",
        "token_stream_ratio": "stream tokens/s / torch.randint blocks, lowest of mqar, induction, selective-copy "
                              "(seq 2048)",
        "files_ratio": "--data-files rows/s (indexed, shuffled stream) / raw pyarrow take of the same rows from the "
                       "file read into memory (parquet, seq 10, batch 256)",
        "files_seek_ratio": "first batch of --data-files at position 10^7 / at 0 (opening the cached index)",
        "files_index_seconds": "seconds to index a generated parquet file (10^7 rows, seq 10; 10^5 with --quick)",
        "files_index_mb": "that index's size on disk (MB)",
        "lm_files_ratio": "training tokens/s of the decoder (2x64, seq 256) on --task lm windows of a .bin token "
                          "file / the same model and loss on the synthetic token stream",
        "lm_index_seconds": "seconds to index a .bin of 10^8 uint16 tokens with offsets (2x10^5 with --quick)",
        "generation_cache_speedup": "distseq generate tokens/s with the decoder's key/value cache / without "
                                    "(2x64, 224 tokens after a 32-token prompt, greedy)",
        "async_block_ratio": "seconds the loop is blocked by an --async-checkpoint save / by a synchronous one "
                             "(151 MB of weights + AdamW state, one process)",
        "sweep_overhead_s_per_point": "seconds a sweep of pool 1 adds per point to the same distseq train runs "
                                      "one after another (tiny points, 1 thread)",
        "sweep_pool_ratio": "points per hour, sweep of pool 2 / pool 1 (one-thread points)",
        "save_mb_per_s": "synchronous checkpoint: MB of state / seconds blocked (DCP write, fsync, sha256, rename)",
        "load_mb_per_s": "MB of state / seconds to load a checkpoint into a fresh model and optimizer",
        "reshard_load_seconds": "seconds for one process to load the checkpoint of 2 FSDP ranks",
        "compile_ratio_decoder": "distseq train --compile tokens/s / eager distseq train (decoder 2x64, mqar seq 256, "
                                 "batch 32, fp32; compile time not counted)",
        "compile_vs_plain_decoder": "distseq train --compile tokens/s / the plain eager PyTorch loop (same decoder)",
        "compile_seconds_decoder": "seconds of the decoder's first compile (the warm-up before step 1)",
        "compile_ratio_lstm": "distseq train --compile tokens/s / eager distseq train (LSTM h256, seq 32, batch 256)",
        "compile_vs_plain_lstm": "distseq train --compile tokens/s / the plain eager PyTorch loop (same LSTM)",
        "compile_seconds_lstm": "seconds of the LSTM's first compile",
        "ac_full_memory_cut": "1 - training's peak memory with --activation-checkpointing full / none (decoder 4x128, "
                              "seq 2048, batch 4; 2x64, batch 2 with --quick; above the memory before the first step)",
        "ac_full_tokens_cost": "1 - tokens/s with --activation-checkpointing full / none (same runs)",
        "ac_selective_memory_cut": "1 - training's peak memory with --activation-checkpointing selective / none",
        "ac_selective_tokens_cost": "1 - tokens/s with --activation-checkpointing selective / none",
        "time_to_99_s": "training seconds of the default preset to 0.99 held-out accuracy",
        "seed_recipe_seconds": "training seconds of the original recipe (10 epochs, plain script)",
        "seed_recipe_accuracy": "its held-out accuracy",
    }
    for key, text in described.items():
        if key in bench:
            goal = ""
            if key in GOALS:
                comparison, target = GOALS[key]
                goal = f"{comparison} {target} ({'met' if bench['goals'][key]['met'] else 'MISSED'})"
            rows.append((key, _fmt(bench[key]), goal, text))
    return rows


def summary_table(bench: Dict) -> str:
    lines = [f"distseq bench on {bench['machine']['device']}, {bench['machine']['cpu_count']} CPUs"
             + (" (quick: short measurements, for a smoke test)" if bench["quick"] else "")]
    lines += [f"  {key:<22} {value:>12}  {goal:<18} {text}" for key, value, goal, text in headline_rows(bench)]
    if "step_time_shares" in bench:
        lines.append("  step time (profile)    "
                     + "  ".join(f"{k}={100 * v:.1f}%" for k, v in ordered_shares(bench["step_time_shares"]).items()))
    if "precision_table" in bench:
        cells = [f"{r['model']}/{r['precision']}=" + (f"{r['steps_per_sec']:.1f}" if r["works"] else "x")
                 for r in bench["precision_table"]]
        lines.append("  precision (steps/s)    " + "  ".join(cells))
    if "startup_seconds" in bench:
        startup = bench["suites"]["startup"]
        seconds = "  ".join(f"{n} proc={v:.1f}" for n, v in bench["startup_seconds"].items())
        lines.append(f"  start-up (s)           {seconds}  (launch to the first step; grows most: "
                     f"{startup['largest_growing_phase']})")
    if "induction_accuracy_2_layers" in bench:
        lines.append(f"  induction accuracy     2 layers={bench['induction_accuracy_2_layers']:.3f}  "
                     f"1 layer={bench['induction_accuracy_1_layer']:.3f}")
        lines.append("  mqar (decoder+conv)    " + "  ".join(
            f"{r['num_kv_pairs']} pairs={r['accuracy']:.3f} at step {r['steps']}" for r in bench["mqar_table"]))
    if "mixer_speed_table" in bench:
        lines.append("  mixers (x attention)   " + "  ".join(
            f"{r['model']}/{r['seq_len']}={r['speed_vs_attention']:.2f}" for r in bench["mixer_speed_table"]))
    if "zoology_table" in bench:
        from .zoology import LABELS

        solved = [r for r in bench["zoology_table"] if r["accuracy"] is not None]
        lines.append("  zoology (best acc.)    " + "  ".join(
            f"{LABELS.get(r['model'], r['model'])}/{r['seq_len']}/{r['width']}={r['accuracy']:.2f}" for r in solved))
    lines.append("  peak RSS (MB)          " + "  ".join(f"{k}={v:.0f}" for k, v in bench["peak_rss_mb"].items()))
    if "peak_cuda_memory_mb" in bench:
        lines.append("  peak CUDA memory (MB)  " + "  ".join(f"{k}={v:.0f}"
                                                            for k, v in bench["peak_cuda_memory_mb"].items()))
    return "\n".join(lines)


def _plot_overhead(plt, s: Dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = ["plain PyTorch loop", "distseq train"]
    values = [s["plain_steps_per_sec"], s["distseq_steps_per_sec"]]
    ax.bar(names, values, color=["#999999", "#1f77b4"])
    for i, key in enumerate(("plain", "distseq")):
        ax.plot([i] * len(s["repeats"][key]), s["repeats"][key], "k.", label="repeats" if i == 0 else None)
    ax.set_ylabel("optimizer steps/s (median)")
    ax.set_title(f"overhead_ratio = {s['overhead_ratio']:.3f} (goal >= 0.95)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_scaling(plt, s: Dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    one, two = s["samples_per_sec"]["1"], s["samples_per_sec"]["2"]
    ax.bar(["1 process", "2 processes"], [one, two], color=["#999999", "#1f77b4"])
    ax.axhline(2 * one, color="k", linestyle="--", linewidth=1, label="ideal (2x)")
    ax.set_ylim(0, 2.25 * one)
    ax.set_ylabel("samples/s (median)")
    ax.set_title(f"scaling_2proc = {s['scaling_2proc']:.2f} (goal >= 1.7)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_accuracy(plt, s: Dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([p["train_seconds"] for p in s["default_curve"]], [p["accuracy"] for p in s["default_curve"]],
            "-o", markersize=3, label=f"distseq default preset ({s['default_precision']})")
    ax.plot([p["train_seconds"] for p in s["seed_recipe_curve"]], [p["accuracy"] for p in s["seed_recipe_curve"]],
            "-s", markersize=3, label="original recipe (plain script, per epoch)")
    ax.axhline(0.99, color="k", linestyle="--", linewidth=1, label="0.99")
    ax.set_xlabel("training seconds (evaluation not counted)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_precision(plt, rows: List[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    kinds = list(dict.fromkeys(r["model"] for r in rows))
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    width = 0.8 / len(precisions)
    for j, precision in enumerate(precisions):
        values = [next((r["steps_per_sec"] or 0.0) for r in rows if r["model"] == k and r["precision"] == precision)
                  for k in kinds]
        ax.bar([i + j * width for i in range(len(kinds))], values, width,
               label={"no": "fp32"}.get(precision, precision))
    ax.set_xticks([i + width * (len(precisions) - 1) / 2 for i in range(len(kinds))], kinds)
    ax.set_ylabel("forward+backward steps/s (0 = does not run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_shares(plt, shares: Dict[str, float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 2.2))
    left = 0.0
    for name, share in shares.items():
        ax.barh([0], [100 * share], left=left, label=f"{name} {100 * share:.1f}%")
        left += 100 * share
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_title("% of step time (overhead config, torch.profiler)", fontsize=10)
    ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _plot_startup(plt, s: Dict, path: Path) -> None:
    """One stacked bar per process count: the launcher, then the main process's phases in order."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    from .startup import in_timeline_order

    counts = list(s["startup_seconds"])
    parts = {"launcher": [max(s["launcher_seconds"][n], 0.0) for n in counts]}  # /proc's 10 ms can put it below 0
    for phase in in_timeline_order(s["phases_seconds"][counts[-1]]):
        parts[phase] = [s["phases_seconds"][n].get(phase, 0.0) for n in counts]
    bottom = [0.0] * len(counts)
    for name, values in parts.items():
        ax.bar(counts, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("processes (1 thread each)")
    ax.set_ylabel("seconds from launch to the first step")
    ax.set_title(f"start-up on {s['cpu_count']} CPUs; grows most: {s['largest_growing_phase']}", fontsize=10)
    ax.legend(ncol=2, fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_memory(plt, memory: Dict[str, float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(memory), list(memory.values()), color="#1f77b4")
    ax.set_ylabel("peak RSS per process (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_induction(plt, s: Dict, path: Path) -> None:
    """Held-out induction accuracy vs step, 2 attention layers against 1."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for layers, marker in (("2", "-o"), ("1", "-s")):
        curve = s["induction_curves"][layers]
        ax.plot([p[0] for p in curve], [p[1] for p in curve], marker, markersize=3,
                label=f"decoder, {layers} layer{'s' if layers != '1' else ''}")
    vocab = s["config"]["induction_2_layers"]["data"]["vocab_size"]
    ax.axhline(1 / (vocab - 1), color="grey", linestyle=":", linewidth=1, label="chance")
    ax.axhline(0.99, color="k", linestyle="--", linewidth=1, label="0.99")
    _finish_accuracy_plot(fig, ax, "optimizer step", "held-out accuracy", "induction: 2 attention layers vs 1",
                          "center right", path)


def _finish_accuracy_plot(fig, ax, xlabel: str, ylabel: str, title: str, legend: str, path: Path) -> None:
    """Labels, an accuracy axis from 0 to 1, title and legend; then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(loc=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_plots(out: Path, bench: Dict) -> Optional[List[str]]:
    """The PNGs for the suites that ran, or None when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    suites, written = bench["suites"], []
    plots = [
        ("overhead.png", "overhead", lambda p: _plot_overhead(plt, suites["overhead"], p)),
        ("scaling.png", "scaling", lambda p: _plot_scaling(plt, suites["scaling"], p)),
        ("time_to_accuracy.png", "accuracy", lambda p: _plot_accuracy(plt, suites["accuracy"], p)),
        ("precision.png", "precision", lambda p: _plot_precision(plt, bench["precision_table"], p)),
        ("step_time.png", "profile", lambda p: _plot_shares(plt, ordered_shares(bench["step_time_shares"]), p)),
        ("recall_induction.png", "recall", lambda p: plot_induction(plt, suites["recall"], p)),
        ("startup.png", "startup", lambda p: _plot_startup(plt, suites["startup"], p)),
        ("memory.png", None, lambda p: _plot_memory(plt, bench["peak_rss_mb"], p)),
    ]
    for filename, suite, draw in plots:
        if suite is None or suite in suites:
            draw(out / filename)
            plt.close("all")
            written.append(filename)
    return written


def details(suites: Dict) -> List[str]:
    """How each headline figure was measured, with both sides of each ratio."""
    lines = ["", "## How each figure was measured", ""]
    if "overhead" in suites:
        o = suites["overhead"]
        lines.append(f"- **overhead**: `distseq train` {o['distseq_steps_per_sec']:.2f} steps/s vs a hand-written loop "
                     f"{o['plain_steps_per_sec']:.2f} steps/s (medians of {len(o['repeats']['plain'])} alternating "
                     f"repeats of {o['steps']} steps, {o['torch_threads']} threads; same model, stream, AdamW, "
                     "schedule and clipping; evaluation and checkpoint writes not counted).")
    if "scaling" in suites:
        c = suites["scaling"]
        lines.append(f"- **scaling**: 1 process {c['samples_per_sec']['1']:,.0f} samples/s, 2 processes "
                     f"{c['samples_per_sec']['2']:,.0f} samples/s (torchrun, gloo, 1 thread each, micro-batch "
                     f"{c['micro_batch_per_rank']} per rank, medians of {len(c['repeats']['1'])} alternating repeats "
                     f"of {c['steps']} steps; CPU even on a GPU machine).")
    if "accuracy" in suites:
        a = suites["accuracy"]
        lines.append(f"- **time to accuracy**: the default preset ({a['default_precision']}) "
                     "evaluated every 50 steps on "
                     f"held-out data, final accuracy {a['default_final_accuracy']:.4f} after "
                     f"{a['default_train_seconds']:.2f} s of training; the original recipe as a plain script "
                     f"(Sigmoid + BCELoss, label shape fixed), evaluated after each of its 10 epochs.")
    if "stream" in suites:
        from .stream import stream_table

        lines += ["- **stream**:", "", "```", stream_table(suites["stream"]), "```"]
    if "tokens" in suites:
        t, g = suites["tokens"], suites["tokens"]["generation"]
        lines.append(f"- **tokens**: training from a token file {t['files_tokens_per_sec']:,.0f} tokens/s vs the "
                     f"synthetic stream {t['stream_tokens_per_sec']:,.0f} (best of {t['sizes']['rounds']} alternating "
                     f"runs of {t['sizes']['steps']} steps, fp32, in one process); indexing "
                     f"{t['lm_index']['tokens']:,} tokens of .bin took {t['lm_index_seconds']:.1f} s, "
                     f"{t['lm_index_parquet']['tokens']:,} of parquet lists {t['lm_index_parquet_seconds']:.1f} s; "
                     f"generation {g['cached_tokens_per_s']:,.0f} tokens/s with the cache, "
                     f"{g['uncached_tokens_per_s']:,.0f} without ({g['threads']} threads).")
    if "files" in suites:
        from .files import files_table

        f = suites["files"]
        lines += [f"- **files**: the trainer's stream over the index (micro-batch {f['micro_batch']}, 0 workers, "
                  "shuffled) vs pyarrow `take` of the same row ids from the file read into memory beforehand "
                  "(untimed), medians "
                  f"of {f['sizes']['repeats']} alternating repeats; first batch: medians of {f['seek_repeats']} "
                  f"alternating repeats ({f['seek_note']}).", "", "```", files_table(f), "```"]
    if "speed" in suites:
        lines += speed_details(suites["speed"])
    return lines


def speed_details(result: Dict) -> List[str]:
    """The report's lines: both sides of every ratio, what dynamo left to eager, the checkpointing table."""
    m, c = result["machine"], result["checkpointing"]
    lines = [f"- **speed** on {m['device']} ({m['cpu']}; flags {' '.join(m['cpu_flags']) or '-'}; ATen "
             f"{m['aten_cpu_capability']}, inductor {m['inductor_vec_isa']}; {m['threads']} threads):"]
    for name in ("decoder", "lstm"):
        w, d = result[f"compile_{name}"], result[f"compile_{name}"]["dynamo"]
        eager = f"; left to eager: {'; '.join(d['left_to_eager'])}" if d["left_to_eager"] else ""
        lines.append(f"  - {name}: `--compile` {w['tokens_per_sec']['compiled']:,.0f} tokens/s, eager "
                     f"{w['tokens_per_sec']['eager']:,.0f}, plain loop {w['tokens_per_sec']['plain']:,.0f} (medians of "
                     f"{len(w['repeats']['plain'])} rotating repeats of {w['steps']} steps); first compile "
                     f"{w['compile_seconds']:.1f} s, dynamo captured {d['ops_captured']} op(s) in {d['graphs']} "
                     f"graph(s){eager}.")
    sizes = c["sizes"]
    lines.append(f"  - activation checkpointing, decoder at seq {sizes['seq_len']}, batch {sizes['batch']}, "
                 f"{sizes['steps']} steps, a fresh process per run, medians of {sizes['repeats']} (memory: "
                 f"{c['measure']}): " + ", ".join(
                     f"{r['mode']} {r['training_peak_mb']:.0f} MB at {r['tokens_per_sec']:,.0f} tokens/s"
                     for r in c["table"]) + ".")
    return lines


def recall_section(r: Dict) -> List[str]:
    """The recall suite: both induction results and the MQAR table, with the configs that produced them."""
    two, one = r["config"]["induction_2_layers"], r["config"]["induction_1_layer"]
    lines = ["", "## Recall: induction heads and MQAR (this run's measurements)", "",
             f"- **induction** (`--preset induction` with: decoder width {two['model']['hidden_size']}, "
             f"{two['model']['num_heads']} heads, {two['model']['positions']} positions, seq {two['data']['seq_len']}, "
             f"vocab {two['data']['vocab_size']}, batch {two['train']['global_batch_size']}, lr {two['optim']['lr']}, "
             f"{two['train']['max_steps']} steps): held-out accuracy **{r['induction_accuracy_2_layers']:.4f}** with 2 "
             f"layers, **{r['induction_accuracy_1_layer']:.4f}** with {one['model']['num_layers']} "
             f"(chance {1 / (two['data']['vocab_size'] - 1):.3f}).", ""]
    d = next(iter(c for name, c in r["config"].items() if name.startswith("mqar_")))
    lines += [f"- **MQAR** (`--preset mqar` with: decoder {d['model']['num_layers']} x {d['model']['hidden_size']}, "
              f"`--short-conv {d['model']['short_conv']}`, vocab {d['data']['vocab_size']}, batch "
              f"{d['train']['global_batch_size']}, lr {d['optim']['lr']}, `--stop-at {d['train']['stop_at']}`, at most "
              f"{d['train']['max_steps']} steps): held-out accuracy per query", "",
              "| kv pairs | seq len | accuracy | sequence accuracy | steps | train s |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {x['num_kv_pairs']} | {x['seq_len']} | {x['accuracy']:.4f} | {x['sequence_accuracy']:.4f} | "
              f"{x['steps']} | {x['train_seconds']:.1f} |" for x in r["mqar_table"]]
    return lines


def mixers_section(m: Dict) -> List[str]:
    from .mixers import speed_table_markdown

    baseline = (f" Peak memory is a fresh process's; one that only imports reaches {m['process_baseline_mb']:.0f} MB."
                if "process_baseline_mb" in m else "")
    return ["", f"## Sequence mixers: training tokens/s against attention ({m['layers']} layers of width {m['width']}, "
                f"{m['tokens_per_step']:,} tokens a step, {m['threads']} threads, {m['device']})", "",
            speed_table_markdown(m["mixer_speed_table"]), "", baseline.strip()]


def zoology_section(z: Dict) -> List[str]:
    from .zoology import table_markdown

    state = "" if z["complete"] else " **Not every point is complete: run the suite again to finish it.**"
    return ["", "## Zoology: MQAR accuracy by model, width and cell (best learning rate)", "",
            f"The sweep is in `{z['sweep_dir']}`; {z['seconds'] / 60:.1f} minutes in this run.{state}", "",
            table_markdown(z["zoology_table"]), "", *(f"![{name[:-4]}]({name})" for name in z.get("plots") or ())]


def startup_section(s: Dict) -> List[str]:
    """Seconds from launch to the end of the first step per process count, and the phases they are made of."""
    from .startup import in_timeline_order

    counts = list(s["startup_seconds"])
    last = counts[-1]
    phases = list(in_timeline_order(s["phases_seconds"][last]))  # JSON files sort their keys
    lines = ["", "## Start-up: launch to the end of the first optimizer step (seconds)", "",
             f"`distseq train` of a tiny LSTM (hidden 16, micro-batch {s['micro_batch_per_rank']} per rank, one step), "
             f"{s['threads_per_process']} thread per process on {s['cpu_count']} CPUs, CUDA hidden; of {s['repeats']} "
             "launches per count (the counts alternating), the run with the median start-up. *launcher*: the "
             "launcher's own start before the main process began (torchrun on more than 1 process); the phases are "
             "the main process's. "
             f"From 1 to {last} processes start-up grows {s['growth']:.2f}x; the phase that grows most is "
             f"**{s['largest_growing_phase']}** (+{s['phase_growth_seconds'][s['largest_growing_phase']]:.2f} s).", "",
             "| processes | start-up | launcher | " + " | ".join(phases) + " |",
             "| --- " * (len(phases) + 3) + "|"]
    for n in counts:
        cells = [f"{s['phases_seconds'][n].get(phase, 0.0):.2f}" for phase in phases]
        launcher = max(s["launcher_seconds"][n], 0.0)  # /proc's 10 ms start time can put it a hair below 0
        lines.append(f"| {n} | {s['startup_seconds'][n]:.2f} | {launcher:.2f} | "
                     + " | ".join(cells) + " |")
    return lines


def report_markdown(bench: Dict, plots: Optional[List[str]]) -> str:
    m = bench["machine"]
    lines = ["# distseq bench report", "",
             f"{m['date']} on {m['device']}, {m['cpu_count']} CPUs, torch {m['torch']}, accelerate {m['accelerate']}"
             + (" -- **quick mode: short measurements, not for comparison**" if bench["quick"] else ""), "",
             "Every ratio compares distseq with a reference measured in the same run on the same machine.", "",
             "| figure | value | goal | compares |", "| --- | --- | --- | --- |"]
    lines += [f"| `{key}` | {value} | {goal} | {text} |" for key, value, goal, text in headline_rows(bench)]
    lines += details(bench["suites"])
    if "step_time_shares" in bench:
        lines += ["", "## Where a step's time goes (overhead config, torch.profiler)", "",
                  "| phase | share |", "| --- | --- |"]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in ordered_shares(bench["step_time_shares"]).items()]
    if "precision_table" in bench:
        lines += ["", "## Precision on this device (forward+backward, hidden 256, seq 32, batch 256)", "",
                  "| model | precision | runs | steps/s | note |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['precision']} | {'yes' if r['works'] else 'no'} | "
                  f"{r['steps_per_sec']:.1f} | |" if r["works"] else
                  f"| {r['model']} | {r['precision']} | no | - | {r['error']} |" for r in bench["precision_table"]]
    if "induction_accuracy_2_layers" in bench:
        lines += recall_section(bench["suites"]["recall"])
    if "mixer_speed_table" in bench:
        lines += mixers_section(bench["suites"]["mixers"])
    if "zoology_table" in bench:
        lines += zoology_section(bench["suites"]["zoology"])
    if "startup_seconds" in bench:
        lines += startup_section(bench["suites"]["startup"])
    lines += ["", "## Peak resident memory per process (MB)", "", "| suite | MB |", "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in bench["peak_rss_mb"].items()]
    for k, v in bench.get("peak_cuda_memory_mb", {}).items():
        lines.append(f"| {k} (CUDA) | {v:.0f} |")
    lines += ["", "## Plots", ""]
    if plots is None:
        lines.append(PLOTS_HINT)
    else:
        lines += [f"![{name[:-4]}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_report(out: Path, bench: Dict, log: Callable[[str], None] = print) -> None:
    plots = write_plots(out, bench)
    (out / "report.md").write_text(report_markdown(bench, plots))
    if plots is None:
        log(f"distseq bench: wrote {out / 'bench.json'} and {out / 'report.md'} (tables only); {PLOTS_HINT}")
    else:
        log(f"distseq bench: wrote {out / 'bench.json'}, {out / 'report.md'} and {len(plots)} plots in {out}")
