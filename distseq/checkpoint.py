"""Checkpoints: ``RUN/checkpoints/step-NNNNNNNN/``, written to a temporary sibling and renamed.

A directory whose name is ``step-N`` is complete by construction: every rank writes its own files
into ``.tmp-step-N``, each file is fsynced, the main process lists every file with its sha256 in
``meta.json`` after a barrier, and only then renames the directory. Older checkpoints are deleted
only after the new one is complete. Loading verifies every hash first and reads tensors with
safetensors or ``torch.load(weights_only=True)``: nothing in a checkpoint executes code.

Files: ``model.safetensors`` and ``trainer_state.pt`` (optimizer + scheduler, identical on every
rank) from the main process; ``rng-rank{r}.pt`` (torch RNG states) and, for --data-files,
``data-rank{r}.json`` (the rank's ``datasets`` state) from each rank; ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .data import derive_seed
from .failpoints import failpoint
from .metrics import write_json

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{8,})$")
# Fields that define what a step's samples are and the model's shape: a checkpoint resumes only if
# they match. Everything else (max_steps, lr, world size, logging, ...) may change across a resume.
IDENTITY = {
    "data": ("task", "seq_len", "min_seq_len", "vocab_size", "copy_len", "block_size", "dataset_size",
             "data_files", "sequence_column", "label_column"),
    "model": ("kind", "hidden_size", "num_layers", "bidirectional", "num_heads", "positions"),
    "train": ("global_batch_size", "seed"),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which and why."""


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


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    accelerator: Accelerator,
    model,
    optimizer,
    scheduler,
    *,
    step: int,
    samples: int,
    config: dict,
    keep_last: int = 0,
    data_state: Optional[dict] = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically on every rank's behalf; returns its directory."""
    final = checkpoint_dir(config["train"]["run_dir"], step)
    tmp = final.with_name(f".tmp-{final.name}")
    rank = accelerator.process_index
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that died half-way
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    mine = [tmp / f"rng-rank{rank}.pt"]
    torch.save(rng_state(), mine[0])
    failpoint("checkpoint-partial", step)
    if data_state is not None:
        mine.append(tmp / f"data-rank{rank}.json")
        mine[-1].write_text(json.dumps(data_state))
    full_state = accelerator.get_state_dict(model)  # every rank: a collective gather under FSDP
    if accelerator.is_main_process:
        weights = {k: v.detach().cpu().contiguous() for k, v in full_state.items()}
        save_file(weights, tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
        mine += [tmp / "model.safetensors", tmp / "trainer_state.pt"]
    for path in mine:
        _fsync(path)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        files = sorted(p.name for p in tmp.iterdir())
        write_json(tmp / "meta.json", {
            "format_version": FORMAT_VERSION,
            "step": step,
            "samples": samples,
            "world_size": accelerator.num_processes,
            "config": config,
            "versions": versions(),
            "sha256": {name: sha256(tmp / name) for name in files},
        })
        _fsync(tmp)
        failpoint("checkpoint-before-rename", step)
        _replace_dir(tmp, final)
        _fsync(final.parent)
        if keep_last:
            for old in list_checkpoints(final.parent.parent)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (a fresh run into an old run dir) is swapped out first."""
    if dst.exists():
        stale = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(dst, stale)
        os.replace(src, dst)
        shutil.rmtree(stale)
    else:
        os.replace(src, dst)


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoint directories (by name), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint after checking its format and every file's sha256."""
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no meta.json (incomplete)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_file} is not valid JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict) or "step" not in meta:
        raise CheckpointError(f"{meta_file} lacks step or sha256")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}; this distseq reads version {FORMAT_VERSION}")
    for name, expected in meta["sha256"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is missing {name}")
        if sha256(file) != expected:
            raise CheckpointError(f"{file} does not match its sha256 in meta.json (damaged)")
    return meta


def select_checkpoint(accelerator: Accelerator, run_dir: str, resume: str, log: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint to resume from, chosen on the main process and shared with every rank.

    ``never``: none. ``auto``: the newest under RUN/checkpoints whose manifest verifies (damaged ones
    are reported and skipped). A path: that checkpoint, or a CheckpointError.
    """
    choice: List[Optional[str]] = [None]
    error: List[str] = [""]
    if accelerator.is_main_process and resume != "never":
        if resume == "auto":
            for candidate in reversed(list_checkpoints(Path(run_dir))):
                try:
                    read_meta(candidate)
                except CheckpointError as problem:
                    log(f"distseq: skipping checkpoint: {problem}")
                    continue
                choice[0] = str(candidate)
                break
        else:
            try:
                read_meta(Path(resume))
                choice[0] = resume
            except CheckpointError as problem:
                error[0] = str(problem)
    broadcast_object_list(choice)
    broadcast_object_list(error)
    if error[0]:
        raise CheckpointError(error[0])
    return Path(choice[0]) if choice[0] else None


def check_compatible(meta: dict, config: dict, path: Path) -> None:
    """Refuse a checkpoint whose data identity or model shape differs from this run's config."""
    for section, names in IDENTITY.items():
        for name in names:
            then, now = meta["config"][section].get(name), config[section].get(name)
            if then != now:
                option = "--model" if name == "kind" else "--" + name.replace("_", "-")
                raise CheckpointError(f"{path} was written with {option} {then}; this run has {now} "
                                      f"(resume with the same value, or --resume never in a new --run-dir)")


@dataclass
class Restored:
    step: int
    samples: int
    world_size: int
    data_state: Optional[dict]


def load_checkpoint(accelerator: Accelerator, path: Path, model, optimizer, scheduler) -> Restored:
    """Restore weights, optimizer, scheduler and (same rank count) this rank's RNG from ``path``."""
    meta = json.loads((path / "meta.json").read_text())  # verified by select_checkpoint
    try:
        accelerator.unwrap_model(model).load_state_dict(load_file(path / "model.safetensors"))
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, SafetensorError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot load: {str(error).splitlines()[0]}") from None
    rank = accelerator.process_index
    rng_file, data_file = path / f"rng-rank{rank}.pt", path / f"data-rank{rank}.json"
    if meta["world_size"] == accelerator.num_processes:
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # a different rank count: per-rank RNG cannot carry over; derive a fresh one per (step, rank)
        torch.manual_seed(derive_seed(meta["config"]["train"]["seed"], meta["step"], rank))
    data_state = json.loads(data_file.read_text()) if data_file.is_file() and meta["world_size"] == accelerator.num_processes else None
    return Restored(meta["step"], meta["samples"], meta["world_size"], data_state)
