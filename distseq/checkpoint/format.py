"""The checkpoint format: where checkpoints lie, what ``meta.json`` holds, and reading it verified.

``RUN/checkpoints/step-NNNNNNNN/`` holds ``state/`` (weights and optimizer state through
torch.distributed.checkpoint, one file per rank; ``dcp.py``), per-rank state files (``rng-rank{r}.pt``,
and ``data-rank{r}.pt`` for --data-streaming) and ``meta.json``: step, samples, world size, sharding, the
resolved config, the run's progress so far, for indexed --data-files the rows' count and content hash,
the plugins, the versions and the sha256 of every other file. A directory whose name is ``step-N`` is
complete by construction (``writer.py``). Reading verifies every hash once and executes no code from
the checkpoint. Version 1 held ``model.safetensors`` + ``trainer_state.pt`` instead of ``state/``; it
still loads.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from safetensors.torch import save as save_safetensors
from torch.distributed.checkpoint.api import CheckpointException

from distseq.checkpoint.dcp import STATE, whole_weights
from distseq.errors import CheckpointError
from distseq.fsio import sha256_file

FORMAT_VERSION = 2  # 2: weights and optimizer in state/ (DCP); 1: model.safetensors + trainer_state.pt (read)
READABLE_VERSIONS = (1, 2)
WEIGHTS = "model.safetensors"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
RETRIES = 5  # a reader re-selects this often when --keep-last of a running job deletes under it


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict:
    return {name: metadata.version(name) for name in ("distseq", "torch", "accelerate", "datasets")}


def _cause(error: BaseException) -> BaseException:
    """DCP wraps every rank's failure into one CheckpointException: the first rank's own error."""
    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]
    return error


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoint directories (by name), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


def read_meta(path: Path, keep: Tuple[str, ...] = ()) -> Tuple[dict, Dict[str, bytes]]:
    """meta.json of a checkpoint after checking its format and every file's sha256, and the bytes of
    the files named in ``keep`` as they were verified (a reader never reads a file twice, so a
    checkpoint deleted after verification is still read whole)."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(_absent(path))
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(_vanished(path) if not path.is_dir()
                              else f"{path} has no meta.json (incomplete)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_file} is not valid JSON") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {meta_file}: {error.strerror or error}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict) or "step" not in meta:
        raise CheckpointError(f"{meta_file} lacks step or sha256")
    config = meta.get("config")
    if (not isinstance(meta["step"], int) or not isinstance(meta.get("samples"), int)
            or not isinstance(meta.get("world_size"), int) or not isinstance(config, dict)
            or not all(isinstance(config.get(section), dict) for section in ("data", "model", "optim", "train"))):
        raise CheckpointError(f"{meta_file} lacks an integer step, samples, world_size or the config sections "
                              "(damaged)")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path} has format version {version}; this distseq reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    kept: Dict[str, bytes] = {}
    for name, expected in meta["sha256"].items():
        file = path / name
        try:
            if name in keep:
                kept[name] = file.read_bytes()
                actual = sha256_bytes(kept[name])
            else:
                actual = sha256_file(file)
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointError(_vanished(path) if not path.is_dir() else f"{path} is missing {name}") from None
        except OSError as error:
            raise CheckpointError(f"cannot read {file}: {error.strerror or error}") from None
        if actual != expected:
            raise CheckpointError(f"{file} does not match its sha256 in meta.json (damaged)")
    if WEIGHTS in keep and WEIGHTS not in meta["sha256"]:  # sharded state: the whole weights, gathered once
        try:
            kept[WEIGHTS] = save_safetensors(weights_for_safetensors(whole_weights(path / STATE)))
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, CheckpointException) as error:
            raise CheckpointError(_vanished(path) if not path.is_dir() else
                                  f"cannot read {path / STATE}: {_first_line(_cause(error))}") from None
    return meta, kept


def _absent(path: Path) -> str:
    """Why ``path`` is no checkpoint: a step that retention removed (its run has others) or not one at all."""
    if STEP_DIR.match(path.name) and path.parent.name == "checkpoints" and path.parent.is_dir():
        others = list_checkpoints(path.parent.parent)
        newest = f"the newest there is {others[-1]}" if others else "none is left there"
        return f"{path} does not exist (removed by --keep-last, or never written); {newest}"
    return f"{path} is not a checkpoint directory"


def _vanished(path: Path) -> str:
    return f"{path} was deleted while being read (by --keep-last of a running job?); choose a newer checkpoint"


def newest_verified(run_dir: Path, log: Callable[[str], None], keep: Tuple[str, ...] = ()
                    ) -> Tuple[Optional[Path], Optional[dict], Dict[str, bytes]]:
    """The newest checkpoint of ``run_dir`` that verifies, its meta and the ``keep`` files' bytes.

    A candidate that disappears while it is read (a running job's --keep-last) is not damage: the
    listing is read again, up to RETRIES times."""
    for _ in range(RETRIES):
        vanished = False
        for candidate in reversed(list_checkpoints(Path(run_dir))):
            try:
                meta, kept = read_meta(candidate, keep)
                return candidate, meta, kept
            except CheckpointError as problem:
                if not candidate.is_dir():
                    vanished = True
                    break
                log(f"distseq: skipping checkpoint: {problem}")
        if not vanished:
            return None, None, {}
    raise CheckpointError(f"the checkpoints of {run_dir} kept being deleted while being read; try again")


def weights_for_safetensors(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous tensors for safetensors, which refuses two names on one storage: a tensor that
    shares its storage with an earlier one (tied embeddings) is written as a copy under its own name,
    and loading ties them again (both names load into the one parameter)."""
    out, seen = {}, set()
    for name, value in state.items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out
