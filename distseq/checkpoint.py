"""Checkpoints: ``RUN/checkpoints/step-NNNNNNNN/`` written to a temporary sibling and renamed.

A directory whose name is ``step-N`` is complete by construction: every file is fsynced and listed
with its sha256 in ``meta.json`` before the rename that gives the directory its name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from importlib import metadata
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from .metrics import write_json

FORMAT_VERSION = 1


def checkpoint_dir(run_dir: str, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def versions() -> dict:
    return {name: metadata.version(name) for name in ("distseq", "torch", "accelerate", "datasets")}


def save_checkpoint(
    accelerator: Accelerator, model, optimizer, scheduler, *, step: int, samples: int, config: dict
) -> Path:
    """Write the checkpoint of ``step`` atomically; returns its final directory on every rank."""
    final = checkpoint_dir(config["train"]["run_dir"], step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that died half-way
        tmp.mkdir(parents=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            _fsync(tmp / name)
        write_json(
            tmp / "meta.json",
            {
                "format_version": FORMAT_VERSION,
                "step": step,
                "samples": samples,
                "world_size": accelerator.num_processes,
                "config": config,
                "versions": versions(),
                "sha256": {name: sha256(tmp / name) for name in files},
            },
        )
        _fsync(tmp)
        if final.exists():  # a rerun into the same run dir: swap, then drop the old copy
            stale = final.with_name(f".old-{final.name}")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
    accelerator.wait_for_everyone()
    return final
