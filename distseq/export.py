"""Use after training: rebuild a model from a checkpoint or an export, and export for inference.

An export is a directory with ``model.safetensors`` and ``config.json`` (model section, the task and
its shape, distseq version, step). ``load_model`` needs neither the trainer nor accelerate.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Tuple

from safetensors.torch import load_file
from torch import nn

from .config import TrainConfig, apply_mapping

EXPORT_VERSION = 1
TASK_FIELDS = ("task", "seq_len", "min_seq_len", "vocab_size", "copy_len")


def config_of(sections: dict) -> TrainConfig:
    """A TrainConfig from saved sections (a checkpoint's meta config or an export's config)."""
    return apply_mapping(TrainConfig(), sections, "saved config")


def build_from(cfg: TrainConfig, weights: Path) -> nn.Module:
    from .models import build_model
    from .tasks import TASKS

    model = build_model(cfg.model, TASKS[cfg.data.task], cfg.task_spec())
    model.load_state_dict(load_file(weights))
    return model.eval()


def model_from_checkpoint(path: Path) -> Tuple[nn.Module, TrainConfig, dict]:
    """The model of a verified checkpoint directory, its config and its meta.json."""
    from .checkpoint import read_meta

    meta = read_meta(Path(path))
    cfg = config_of(meta["config"])
    return build_from(cfg, Path(path) / "model.safetensors"), cfg, meta


def export(checkpoint: Path, out_dir: Path) -> Path:
    from .metrics import write_json  # here, not at the top: load_model must not import accelerate

    _, cfg, meta = model_from_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(checkpoint) / "model.safetensors", out_dir / "model.safetensors")
    write_json(out_dir / "config.json", {
        "format_version": EXPORT_VERSION,
        "model": cfg.to_dict()["model"],
        "data": {name: getattr(cfg.data, name) for name in TASK_FIELDS},
        "distseq_version": metadata.version("distseq"),
        "step": meta["step"],
    })
    return out_dir


def load_model(directory) -> nn.Module:
    """The exported model in eval mode; ``model.distseq_config`` holds its config.json."""
    directory = Path(directory)
    saved = json.loads((directory / "config.json").read_text())
    model = build_from(config_of({"model": saved["model"], "data": saved["data"]}), directory / "model.safetensors")
    model.distseq_config = saved
    return model
