"""Use after training: rebuild a model from a checkpoint or an export, and export for inference.

An export is a directory with ``model.safetensors`` and ``config.json`` (the model section with the
model's own options, the task and its shape with the task's own options, the plugins, distseq's
version, the step). ``load_model`` needs neither the trainer nor accelerate. Saved configs from before
options belonged to their owners (every model's options in every config) load too.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional, Tuple

from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from torch import nn

from distseq.checkpoint.format import WEIGHTS, read_meta
from distseq.config import TrainConfig, apply_mapping
from distseq.errors import CheckpointError
from distseq.fsio import write_bytes_atomically, write_json
from distseq.models import build_model
from distseq.registry import REPLACED, TASKS, check_replacements, import_recorded

EXPORT_VERSION = 1
TASK_FIELDS = ("task", "seq_len", "min_seq_len", "vocab_size")  # and the task's own options


def config_of(sections: dict) -> TrainConfig:
    """A TrainConfig from saved sections (a checkpoint's meta config or an export's config)."""
    return apply_mapping(TrainConfig(), sections, "saved config", saved=True)


def build_from(cfg: TrainConfig, weights: dict) -> nn.Module:
    model = build_model(cfg.model, TASKS[cfg.data.task], cfg.task_spec())
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"the weights do not fit --model {cfg.model.kind} for --task {cfg.data.task} "
                              f"({str(error).splitlines()[0][:120]}); a module given to distseq.train(model=...) "
                              f"loads back only as a registered model (distseq.register_model)") from None
    return model.eval()


def model_from_checkpoint(path: Path, verified: Optional[Tuple[dict, Dict[str, bytes]]] = None
                          ) -> Tuple[nn.Module, TrainConfig, dict]:
    """The model of a checkpoint directory, its config and its meta.json. The weights are read once,
    as verified, so a checkpoint deleted right after (a running job's --keep-last) still loads."""
    meta, files = verified or read_meta(Path(path), keep=(WEIGHTS,))
    import_recorded(meta.get("plugins", []), meta["config"]["data"]["task"], meta["config"]["model"]["kind"],
                    meta.get(REPLACED))  # the run's own tasks and models
    check_replacements(meta.get(REPLACED), meta["config"]["data"]["task"], meta["config"]["model"]["kind"], str(path))
    cfg = config_of(meta["config"])
    return build_from(cfg, load_safetensors(files[WEIGHTS])), cfg, meta


def export(checkpoint: Path, out_dir: Path) -> Path:
    meta, files = read_meta(Path(checkpoint), keep=(WEIGHTS,))
    _, cfg, _ = model_from_checkpoint(checkpoint, (meta, files))  # proves the weights load
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(out_dir / WEIGHTS, files[WEIGHTS])
    saved = cfg.to_dict()
    write_json(out_dir / "config.json", {
        "format_version": EXPORT_VERSION,
        "model": saved["model"],
        "data": {name: saved["data"][name] for name in (*TASK_FIELDS, *cfg.data.own_options())},
        "distseq_version": metadata.version("distseq"),
        "plugins": meta.get("plugins", []),
        **({REPLACED: meta[REPLACED]} if meta.get(REPLACED) else {}),
        "step": meta["step"],
    })
    return out_dir


def load_model(directory) -> nn.Module:
    """The exported model in eval mode; ``model.distseq_config`` holds its config.json."""
    directory = Path(directory)
    if (directory / "meta.json").is_file():
        raise CheckpointError(f"{directory} is a checkpoint, not an export: distseq export --checkpoint {directory} "
                              f"--out EXPORT_DIR writes one that load_model reads")
    if not (directory / "config.json").is_file() or not (directory / WEIGHTS).is_file():
        missing = "no such directory" if not directory.is_dir() else "no " + " or ".join(
            name for name in ("config.json", WEIGHTS) if not (directory / name).is_file())
        raise CheckpointError(f"{directory}: not an export of distseq ({missing}); distseq export --checkpoint "
                              f"RUN/checkpoints/step-N --out {directory} writes one")
    saved = json.loads((directory / "config.json").read_text())
    import_recorded(saved.get("plugins", []), saved["data"]["task"], saved["model"]["kind"], saved.get(REPLACED))
    check_replacements(saved.get(REPLACED), saved["data"]["task"], saved["model"]["kind"], str(directory))
    model = build_from(config_of({"model": saved["model"], "data": saved["data"]}), load_file(directory / WEIGHTS))
    model.distseq_config = saved
    return model
