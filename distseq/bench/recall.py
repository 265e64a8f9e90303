"""The recall suite: two published findings about attention and recall, reproduced on a CPU.

- **Induction heads** (Olsson et al. 2022): a causal decoder with 2 attention layers learns
  ``induction`` (predict the token that followed the last token's earlier occurrence) to held-out
  accuracy ~1.0, where 1 layer stays near chance (1 / (vocab - 1)): one attention layer cannot compose
  "find the previous A" with "read the token after it". Both curves (held-out accuracy vs step).
- **MQAR** (Arora et al. 2023, "Zoology"): accuracy vs --num-kv-pairs for the decoder and an LSTM of
  the same width, with the same step budget, batch and learning rate per cell. Attention keeps every
  pair in its context; the LSTM's fixed state must hold them all, so it falls as the pairs grow.

Everything is ``distseq.training.loop.train`` on the presets (``induction``, ``mqar``) with the overrides below;
``config`` in recall.json holds each experiment's full configuration. The table is whatever this
run measured.
"""

from __future__ import annotations

import copy
import tempfile
import time
from typing import Callable, Dict, List

INDUCTION_TARGET = 0.99
# the ``induction`` preset (seq 16, vocab 16, 1,024 sequences a step: one answer per sequence, so the
# batch is large; at 256 the head had not formed by step 1,700) with these overrides; num_layers 2 or 1
INDUCTION = {"train": {"max_steps": 400, "eval_every": 50}}
INDUCTION_QUICK = {"data": {"eval_size": 64}, "train": {"max_steps": 10, "eval_every": 5, "global_batch_size": 64}}

MQAR_PAIRS = (4, 8, 16, 32)
MQAR_MODELS = ("decoder", "lstm")
# the ``mqar`` preset (vocab 128, 256 sequences a step) for both models (the LSTM: as many layers of
# the same width), the same budget per cell: 300 steps. seq_len is max(MQAR_MIN_SEQ_LEN, 4 x pairs):
# 64 up to 16 pairs, 128 for 32 (the task needs 4 x pairs)
MQAR_MIN_SEQ_LEN = 64
MQAR = {"train": {"max_steps": 300, "eval_every": 0}}
MQAR_QUICK = {"data": {"vocab_size": 64, "eval_size": 64}, "train": {"max_steps": 5, "eval_every": 0,
                                                                     "global_batch_size": 64}}
MQAR_QUICK_MIN_SEQ_LEN = 32
MQAR_QUICK_PAIRS = (4, 8)


def _config(name: str, overrides: Dict[str, dict]):
    """The preset ``name`` with ``overrides`` as a config file would give them (another model starts from its
    own options' defaults, not the preset's decoder's)."""
    from distseq.config import from_sources

    cfg = from_sources(name, overrides, "the recall suite")
    cfg.log.progress = False
    cfg.checkpoint.checkpoint_every, cfg.checkpoint.resume = 0, "never"
    return cfg


def _merge(*layers: Dict[str, dict]) -> Dict[str, dict]:
    merged: Dict[str, dict] = {}
    for layer in layers:
        for section, fields in layer.items():
            merged.setdefault(section, {}).update(fields)
    return merged


def _train(cfg) -> dict:
    from distseq.training.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.run_dir = tmp
        summary = train(cfg)
    cfg.train.run_dir = "(a temporary directory)"
    return summary


def induction_runs(quick: bool, log: Callable[[str], None]) -> Dict:
    base = INDUCTION_QUICK if quick else INDUCTION
    result: Dict = {"induction_curves": {}, "config": {}}
    for layers in (2, 1):
        cfg = _config("induction", _merge(base, {"model": {"num_layers": layers}}))
        summary = _train(cfg)
        curve = [[p["step"], p["eval/accuracy"]] for p in summary["eval_history"]]
        reached = next((p for p in summary["eval_history"] if p["eval/accuracy"] >= INDUCTION_TARGET), None)
        key = "induction_accuracy_2_layers" if layers == 2 else "induction_accuracy_1_layer"
        result[key] = summary["eval/accuracy"]
        result["induction_curves"][str(layers)] = curve
        result[f"induction_train_seconds_{layers}"] = summary["train_seconds"]
        result[f"induction_steps_to_{INDUCTION_TARGET}_{layers}"] = reached["step"] if reached else None
        result["config"][f"induction_{layers}_layer{'s' if layers > 1 else ''}"] = cfg.to_dict()
        log(f"  induction, {layers} layer{'s' if layers > 1 else ' '}: held-out accuracy "
            f"{summary['eval/accuracy']:.4f} "
            f"after {cfg.train.max_steps} steps ({summary['train_seconds']:.1f} s of training; chance "
            f"{1 / (cfg.data.vocab_size - 1):.3f}); {INDUCTION_TARGET} "
            + (f"at step {reached['step']}" if reached else "not reached"))
    return result


def mqar_runs(quick: bool, log: Callable[[str], None]) -> Dict:
    base, pairs = (MQAR_QUICK, MQAR_QUICK_PAIRS) if quick else (MQAR, MQAR_PAIRS)
    min_len = MQAR_QUICK_MIN_SEQ_LEN if quick else MQAR_MIN_SEQ_LEN
    rows: List[dict] = []
    configs: Dict[str, dict] = {}
    for model in MQAR_MODELS:
        for m in pairs:
            # the LSTM: the preset's depth and width (the decoder's heads and rotary positions are its own)
            cfg = _config("mqar", _merge(base, {"data": {"num_kv_pairs": m, "seq_len": max(min_len, 4 * m)},
                                        "model": {"kind": model}}))
            summary = _train(cfg)
            rows.append({"model": model, "num_kv_pairs": m, "seq_len": cfg.data.seq_len,
                         "accuracy": summary["eval/accuracy"], "sequence_accuracy": summary["eval/sequence_accuracy"],
                         "steps": cfg.train.max_steps, "train_seconds": summary["train_seconds"]})
            log(f"  mqar, {model:<7} hidden {cfg.model.hidden_size}, {m:>2} pairs, seq {cfg.data.seq_len}: accuracy "
                f"{summary['eval/accuracy']:.4f} (sequences {summary['eval/sequence_accuracy']:.4f}) after "
                f"{cfg.train.max_steps} steps, {summary['train_seconds']:.1f} s")
            entry = copy.deepcopy(cfg.to_dict())
            # the fields that vary across a model's cells
            entry["data"]["num_kv_pairs"] = list(pairs)
            entry["data"]["seq_len"] = [max(min_len, 4 * p) for p in pairs]
            configs[f"mqar_{model}"] = entry
    return {"mqar_table": rows, "config": configs}


def mqar_table_text(rows: List[dict]) -> str:
    """Accuracy per (model, pairs): one line per model."""
    pairs = sorted({r["num_kv_pairs"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [f"  {'model':<8}" + "".join(f"{f'{m} pairs':>10}" for m in pairs)]
    for model in models:
        cells = {r["num_kv_pairs"]: r["accuracy"] for r in rows if r["model"] == model}
        lines.append(f"  {model:<8}" + "".join(f"{cells[m]:>10.3f}" if m in cells else f"{'-':>10}" for m in pairs))
    return "\n".join(lines)


def recall_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    start = time.perf_counter()
    induction = induction_runs(quick, log)
    mqar = mqar_runs(quick, log)
    log("  mqar accuracy (per query) by model and number of key-value pairs:")
    log(mqar_table_text(mqar["mqar_table"]))
    result = {**induction, **mqar, "config": {**induction["config"], **mqar["config"]}}
    result["seconds"] = time.perf_counter() - start
    return result
