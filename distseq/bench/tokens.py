"""Your own tokens: training from token files against the synthetic stream, the token index's build time,
and generation with and without the decoder's cache.

``lm_files_ratio``: training tokens/s of the decoder on ``--task lm`` windows of a ``.bin`` token file ÷ the
same model, loss and batch on the synthetic token stream of the same shape (the lm task's uniform tokens,
every position labelled, so only where the windows come from differs). The two take turns, ``rounds`` times,
each keeping its best run; each run is ``distseq.train`` in this process (one thread, fp32).

``lm_index_seconds``: ``open_token_index`` of a fresh ``.bin`` of ``index_tokens`` uint16 ids (10^8; GPT-2's
vocabulary, a document every 1,000 tokens by its offsets file, an end-of-document id packed after each) into
an empty cache: reading, checking every id, packing, writing and hashing. Also a parquet file of lists
(``lm_index_parquet_seconds``, a tenth of the tokens).

``generation``: ``bench/generation.py``'s tokens/s of ``distseq generate`` with the cache and without.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import numpy as np

FULL = {"seq_len": 256, "width": 64, "layers": 2, "batch": 16, "steps": 30, "rounds": 3, "file_tokens": 2_000_000,
        "index_tokens": 100_000_000, "document": 1000, "vocab": 50257}
QUICK = {"seq_len": 32, "width": 16, "layers": 1, "batch": 4, "steps": 3, "rounds": 1, "file_tokens": 20_000,
         "index_tokens": 200_000, "document": 1000, "vocab": 50257}
STREAM_TASK = "lm-stream"  # the lm task's own synthetic stream, for the comparison only


def write_bin(path: Path, tokens: int, vocab: int, document: int, seed: int = 0) -> None:
    """``tokens`` uniform uint16 ids and NAME.offsets.npy with a document every ``document`` tokens."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        for start in range(0, tokens, 1 << 24):  # bounded memory for 10^8 tokens
            rng.integers(0, vocab, min(1 << 24, tokens - start), dtype=np.uint16).tofile(handle)
    np.save(path.with_suffix(".offsets.npy"), np.arange(0, tokens, document, dtype=np.int64))


def index_seconds(path: Path, cache: Path, vocab: int) -> Dict:
    """Seconds to index ``path`` into an empty cache, and what the index holds."""
    from distseq.data.tokens import TokenLayout, open_token_index

    layout = TokenLayout("tokens", "tokens", vocab, vocab - 1, "uint16", "none")
    started = time.perf_counter()
    index = open_token_index([str(path)], layout, None, 256, "packed", str(cache), say=lambda line: None,
                             progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": index.tokens, "documents": index.documents,
            "tokens_per_sec": index.tokens / seconds, "file_mb": path.stat().st_size / 1e6}


def parquet_index_seconds(tmp: Path, tokens: int, vocab: int, document: int) -> Dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    values = rng.integers(0, vocab, tokens, dtype=np.int32)
    offsets = np.arange(0, tokens + 1, document, dtype=np.int32)
    path = tmp / "lists.parquet"
    pq.write_table(pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))}), path)
    return index_seconds(path, tmp / "cache-parquet", vocab)


def _register_stream_task() -> None:
    """The lm task drawing its own uniform tokens, without files: the synthetic side of the comparison."""
    from distseq.registry import TASKS

    if STREAM_TASK not in TASKS:
        lm = TASKS["lm"]
        TASKS.add(STREAM_TASK, dataclasses.replace(lm, name=STREAM_TASK, validate=None, language_model=False),
                  None, source="distseq.bench.tokens")


def _train(sizes: Dict, run_dir: Path, data: Dict) -> float:
    """Training tokens/s of one run of the decoder (fp32, no evaluation, no checkpoint)."""
    import distseq
    from distseq.config import from_sources

    overrides = {"model.kind": "decoder", "model.hidden_size": sizes["width"], "model.num_layers": sizes["layers"],
                 "data.seq_len": sizes["seq_len"], "data.vocab_size": sizes["vocab_model"],
                 "train.global_batch_size": sizes["batch"], "train.max_steps": sizes["steps"],
                 "train.eval_every": 0, "train.precision": "no", "train.run_dir": str(run_dir),
                 "checkpoint.checkpoint_every": 0, "log.log_every": 10**6, "log.progress": False,
                 "data.eval_size": 1, **data}
    cfg = from_sources("default", overrides=overrides)
    return distseq.train(cfg)["tokens_per_sec"]


def files_against_stream(tmp: Path, sizes: Dict, log: Callable[[str], None]) -> Dict:
    _register_stream_task()
    path = tmp / "train.bin"
    vocab = 256  # the model's output layer: a byte-sized vocabulary keeps the comparison about the data
    write_bin(path, sizes["file_tokens"], vocab, sizes["document"])
    sizes = {**sizes, "vocab_model": vocab}
    sides = {"files": {"data.task": "lm", "data.data_files": str(path), "data.data_cache": str(tmp / "cache"),
                       "data.eod_id": vocab - 1, "data.eval_share": 0.01},
             "stream": {"data.task": STREAM_TASK}}
    best = {side: 0.0 for side in sides}
    for round_ in range(sizes["rounds"]):
        for side, data in sides.items():
            best[side] = max(best[side], _train(sizes, tmp / f"run-{side}-{round_}", data))
    log(f"tokens: training from a token file {best['files']:,.0f} tokens/s, the synthetic stream "
        f"{best['stream']:,.0f}: {best['files'] / best['stream']:.3f}")
    return {"lm_files_ratio": best["files"] / best["stream"], "files_tokens_per_sec": best["files"],
            "stream_tokens_per_sec": best["stream"]}


def tokens_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    from distseq.bench.generation import QUICK as GENERATION_QUICK
    from distseq.bench.generation import generation_speed

    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="distseq-bench-tokens-") as name:
        tmp = Path(name)
        training = files_against_stream(tmp, sizes, log)
        big = tmp / "index.bin"
        write_bin(big, sizes["index_tokens"], sizes["vocab"], sizes["document"])
        built = index_seconds(big, tmp / "cache-index", sizes["vocab"])
        big.unlink()
        log(f"tokens: indexed {built['tokens']:,} tokens ({built['file_mb']:.0f} MB of .bin) in "
            f"{built['seconds']:.1f} s ({built['tokens_per_sec'] / 1e6:.1f} M tokens/s)")
        lists = parquet_index_seconds(tmp, sizes["index_tokens"] // 10, sizes["vocab"], sizes["document"])
        log(f"tokens: indexed {lists['tokens']:,} tokens of parquet lists in {lists['seconds']:.1f} s")
    generation = generation_speed(**(GENERATION_QUICK if quick else {}))
    log(f"tokens: generation {generation['cached_tokens_per_s']:,.0f} tokens/s with the cache, "
        f"{generation['uncached_tokens_per_s']:,.0f} without ({generation['cache_speedup']:.1f}x)")
    return {**training, "lm_index_seconds": built["seconds"], "lm_index_tokens": built["tokens"],
            "lm_index": built, "lm_index_parquet_seconds": lists["seconds"], "lm_index_parquet": lists,
            "generation": generation, "generation_cache_speedup": generation["cache_speedup"],
            "sizes": {k: v for k, v in sizes.items()}}
