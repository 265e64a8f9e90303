"""Checkpoints: ``RUN/checkpoints/step-NNNNNNNN/``, written to a temporary sibling and renamed.

A directory whose name is ``step-N`` is complete by construction: every rank writes its own files
into ``.tmp-step-N``, each file is fsynced, the main process lists every file with its sha256 in
``meta.json`` after all ranks agree their writes succeeded, and only then renames the directory.
Older checkpoints are renamed out of the ``step-N`` namespace before they are deleted, and only after
the new one is complete. A checkpoint is verified (every hash) once when it is selected; reading it
executes no code from it (state.py).

Files: ``state/`` (weights and optimizer state through torch.distributed.checkpoint, one file per
rank; state.py), ``rng-rank{r}.pt`` (torch RNG states) and, for --data-files --data-streaming,
``data-rank{r}.json`` (the rank's ``datasets`` state) from each rank; ``meta.json`` (step, samples,
world size, sharding, the resolved config, the run's progress so far: training seconds, evaluations,
skipped steps, changes of options; for indexed --data-files, ``data``: the rows' count and content
hash). Version 1 held ``model.safetensors`` + ``trainer_state.pt`` instead of ``state/``; it still loads.
With --async-checkpoint the state is written in the background and the rename waits for it.
The learning-rate schedule is not stored: it is a function of the step and the options.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import save as save_safetensors
from torch.distributed.checkpoint.api import CheckpointException

from .data import derive_seed
from .errors import CheckpointError, RunIOError
from .failpoints import failpoint
from .io import sha256_file, write_durably, write_json
from .registry import PLUGINS
from .state import STATE, checkpoint_group, load_state, load_whole_state, save_state, whole_weights

FORMAT_VERSION = 2  # 2: weights and optimizer in state/ (DCP); 1: model.safetensors + trainer_state.pt (read)
READABLE_VERSIONS = (1, 2)
WEIGHTS = "model.safetensors"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
# Fields that define what a step's samples are and the model's shape: a checkpoint resumes only if
# they match. Everything else (max_steps, lr, world size, logging, ...) may change across a resume.
IDENTITY = {
    "data": ("task", "seq_len", "min_seq_len", "vocab_size", "copy_len", "num_kv_pairs", "block_size",
             "dataset_size", "data_files", "data_streaming", "sequence_column", "label_column"),
    "model": ("kind", "hidden_size", "num_layers", "bidirectional", "num_heads", "positions", "tie_embeddings"),
    "train": ("global_batch_size", "seed"),
}
RETRIES = 5  # a reader re-selects this often when --keep-last of a running job deletes under it


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def versions() -> dict:
    return {name: metadata.version(name) for name in ("distseq", "torch", "accelerate", "datasets")}


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _any_rank(accelerator: Accelerator, failed: bool) -> bool:
    """True on every rank when ``failed`` is true on any (one all-reduce; none on one process)."""
    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor(float(failed), device=accelerator.device)
    return bool(accelerator.reduce(flag, "max").item())


def _cause(error: BaseException) -> BaseException:
    """DCP wraps every rank's failure into one CheckpointException: the first rank's own error."""
    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]
    return error


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _io_failure(error: BaseException, where: Optional[Path] = None) -> str:
    """One line for a failed write, naming the file (or ``where`` the writer was writing)."""
    error = _cause(error)
    if isinstance(error, OSError):
        return f"cannot write {error.filename or where or 'a checkpoint file'}: {error.strerror or error}"
    return f"cannot write the checkpoint: {_first_line(error)}"


@dataclass
class PendingSave:
    """A checkpoint whose state is being written in the background (--async-checkpoint)."""

    step: int
    final: Path
    future: object  # DCP's Future of this rank's write
    thread: Optional[threading.Thread] = None  # main process: waits for the write, then completes the checkpoint
    problem: str = "its completion did not run"  # the main process's thread sets the outcome
    where: Optional[Path] = None  # the directory being written, for a failure that names no file

    def finish(self) -> str:
        """Wait for this rank's part; '' when the checkpoint is complete (main) or the write succeeded."""
        if self.thread is not None:
            self.thread.join()
            return self.problem
        return _written(self.future, self.where)


def _written(future, where: Optional[Path]) -> str:
    """Wait for DCP's Future of a background write; '' when it succeeded, else the one-line problem."""
    try:
        future.result()
    except (Exception, CheckpointException) as error:  # DCP reports every rank's failure to every rank
        return _io_failure(error, where)
    return ""


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    model,
    optimizer,
    *,
    step: int,
    samples: int,
    config: dict,
    progress: dict,
    keep_last: int = 0,
    data_state: Optional[dict] = None,
    data_identity: Optional[dict] = None,
    previous: Optional[Path] = None,
    sharding: str = "none",
    group=None,
    asynchronous: bool = False,
):
    """Write the checkpoint of ``step`` atomically on every rank's behalf; returns its directory, or
    with ``asynchronous`` a PendingSave once the state is copied to host memory.

    The weights and optimizer state go through ``torch.distributed.checkpoint`` into ``state/``: each
    rank writes its own file, in parallel. A failed write on any rank (no space, no permission,
    read-only file system) removes the temporary directory and raises RunIOError on every rank,
    naming the file and ``previous``, the newest complete checkpoint, which is untouched.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    rank = accelerator.process_index
    kept = f"kept {previous}" if previous else "no earlier checkpoint of this run exists"
    problem = ""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that died half-way
        try:
            tmp.mkdir(parents=True)
        except OSError as error:
            problem = _io_failure(error)
    if _any_rank(accelerator, bool(problem)):
        raise RunIOError(f"{problem or 'the main process could not create the checkpoint directory'}; {kept}")

    files: Dict[str, bytes] = {f"rng-rank{rank}.pt": _torch_bytes(rng_state())}
    if data_state is not None:
        files[f"data-rank{rank}.json"] = json.dumps(data_state).encode()
    try:
        for name, data in files.items():
            write_durably(tmp / name, data)
            failpoint("checkpoint-partial", step)
    except OSError as error:
        problem = _io_failure(error)
    _agree_written(accelerator, problem, tmp, kept)  # before DCP's own collectives, which a failed rank would skip
    future = None
    try:
        future = save_state(tmp / STATE, model, optimizer, group, asynchronous)  # async: once copied to host
    except (Exception, CheckpointException) as error:  # OSError, or DCP's report of every rank's failure
        problem = _io_failure(error, tmp / STATE)
    _agree_written(accelerator, problem, tmp, kept)

    # a copy: the loop goes on changing its progress while a background save has yet to write meta.json
    meta = {"format_version": FORMAT_VERSION, "step": step, "samples": samples,
            "world_size": accelerator.num_processes, "sharding": sharding, "config": config,
            "progress": copy.deepcopy(progress),
            **({"data": data_identity} if data_identity is not None else {}),
            "plugins": list(PLUGINS),  # what eval, predict, export and load_model import again
            "versions": versions()}
    if asynchronous:
        pending = PendingSave(step, final, future, where=tmp / STATE)
        if accelerator.is_main_process:
            def complete_in_background() -> None:
                failpoint("checkpoint-background", step)
                try:
                    pending.problem = _written(future, tmp / STATE) or _complete(tmp, final, meta, files)
                except BaseException as error:  # whatever ends this thread before the rename is the outcome
                    pending.problem = f"cannot complete the checkpoint: {_first_line(error)}"
                if not pending.problem and keep_last:
                    apply_retention(Path(run_dir), step, keep_last)

            pending.thread = threading.Thread(target=complete_in_background, name=f"checkpoint-{step}")
            pending.thread.start()
        return pending
    if accelerator.is_main_process:
        problem = _complete(tmp, final, meta, files)
    if _any_rank(accelerator, bool(problem)):
        raise RunIOError(f"{problem or 'the main process could not complete the checkpoint'}; {kept}")
    if accelerator.is_main_process and keep_last:
        apply_retention(Path(run_dir), step, keep_last)
    accelerator.wait_for_everyone()
    return final


def _agree_written(accelerator: Accelerator, problem: str, tmp: Path, kept: str) -> None:
    """Every rank learns whether any rank failed to write its part; then all raise the same RunIOError."""
    if _any_rank(accelerator, bool(problem)):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        error = RunIOError(f"{problem or 'another process could not write its checkpoint files'}; {kept}")
        error.every_rank = bool(problem)  # the rank that met it names the file itself
        raise error


def _complete(tmp: Path, final: Path, meta: dict, files: Dict[str, bytes]) -> str:
    """Main process, once every rank's files are written: meta.json lists each file with its sha256,
    then the directory is fsynced and renamed to ``step-N``. '' on success, else the one-line problem
    (the temporary directory is removed)."""
    try:
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        hashes = {name: sha256_bytes(files[name]) if name in files else sha256_file(tmp / name) for name in names}
        write_json(tmp / "meta.json", {**meta, "sha256": hashes})
        _fsync_dir(tmp / STATE)
        _fsync_dir(tmp)
        failpoint("checkpoint-before-rename", meta["step"])
        _replace_dir(tmp, final)
        _fsync_dir(final.parent)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        return _io_failure(error)
    return ""


def apply_retention(run_dir: Path, step: int, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``step``. Each older one is first renamed out of
    the ``step-N`` namespace, so an interrupted deletion never leaves a partial ``step-N``."""
    older = [p for p in list_checkpoints(run_dir) if step_of(p) <= step][:-keep_last]
    for old in older:
        doomed = old.with_name(f".deleting-{old.name}")
        try:
            os.replace(old, doomed)
        except OSError:
            continue  # deleted by someone else, or not ours to delete: retention is best effort
        shutil.rmtree(doomed, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (the same step written again) is swapped out first."""
    if dst.exists():
        stale = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(dst, stale)
        os.replace(src, dst)
        shutil.rmtree(stale)
    else:
        os.replace(src, dst)


def clear_debris(run_dir: Path) -> None:
    """Remove what interrupted saves and deletions left (called under the run-dir lock, before a run):
    ``.tmp-step-N`` (an incomplete save) and ``.deleting-step-N`` (retention cut short). A
    ``.old-step-N`` is a complete checkpoint caught in the middle of being replaced: it goes back to
    ``step-N`` if that name is free, else it is the stale copy and is removed."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for path in root.iterdir():
        name = path.name
        if name.startswith(".old-step-") and not (root / name[len(".old-"):]).exists():
            os.replace(path, root / name[len(".old-"):])
        elif name.startswith((".tmp-step-", ".deleting-step-", ".old-step-")):
            shutil.rmtree(path, ignore_errors=True)


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
        raise CheckpointError(f"{path} is not a checkpoint directory")
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(_vanished(path) if not path.is_dir() else f"{path} has no meta.json (incomplete)") from None
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
        raise CheckpointError(f"{meta_file} lacks an integer step, samples, world_size or the config sections (damaged)")
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


def _vanished(path: Path) -> str:
    return f"{path} was deleted while being read (by --keep-last of a running job?); choose a newer checkpoint"


def select_checkpoint(accelerator: Accelerator, run_dir: Path, resume: str, log: Callable[[str], None]
                      ) -> Tuple[Optional[Path], Optional[dict]]:
    """The checkpoint to resume from and its verified meta.json, chosen on the main process and shared
    with every rank.

    ``never``: none. ``auto``: the newest under RUN/checkpoints whose manifest verifies (damaged ones
    are reported and skipped; one deleted under the reader is looked for again). A path: that
    checkpoint, or a CheckpointError.
    """
    choice: List = [None, None, ""]  # path, meta, error
    if accelerator.is_main_process and resume != "never":
        try:
            path, meta, _ = newest_verified(run_dir, log) if resume == "auto" else (Path(resume), *read_meta(Path(resume)))
            choice[:2] = (str(path) if path else None), meta
        except CheckpointError as problem:
            choice[2] = str(problem)
    broadcast_object_list(choice)
    if choice[2]:
        raise CheckpointError(choice[2])
    return (Path(choice[0]) if choice[0] else None), choice[1]


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


def check_compatible(meta: dict, config: dict, path: Path) -> None:
    """Refuse a checkpoint whose data identity or model shape differs from this run's config. An
    option newer than the checkpoint counts as its default (the behaviour before it existed)."""
    from .config import SECTIONS

    for section, names in IDENTITY.items():
        for name in names:
            if (section, name) == ("data", "data_files") and "data" in meta and config["data"].get("data_files"):
                continue  # indexed files are identified by their content (meta "data"), wherever they lie now
            then = meta["config"][section].get(name, _default_then(meta, section, name, SECTIONS))
            now = config[section].get(name)
            if then != now:
                option = "--model" if name == "kind" else "--" + name.replace("_", "-")
                raise CheckpointError(f"{path} was written with {option} {then}; this run has {now} "
                                      f"(resume with the same value, or --resume never in a new --run-dir)")


def _default_then(meta: dict, section: str, name: str, sections: dict):
    """The value an option newer than the checkpoint had in effect: its default, except that --data-files
    were streamed before --data-streaming existed."""
    if (section, name) == ("data", "data_streaming"):
        return meta["config"]["data"].get("data_files") is not None
    return getattr(sections[section](), name)


def changed_options(meta: dict, config: dict) -> Dict[str, list]:
    """``{"section.field": [then, now]}`` for every option that differs from the checkpoint's config."""
    changes = {}
    for section, values in config.items():
        for name, now in values.items():
            then = meta["config"].get(section, {}).get(name, now)
            if then != now and name not in ("resume", "overwrite", "run_dir", "start_step"):  # how it started
                changes[f"{section}.{name}"] = [then, now]
    return changes


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


class CheckpointManager:
    """Owns RUN/checkpoints for a run: the checkpoint it resumes from (verified once), whether a step
    saves (every --checkpoint-every steps, the last step, a stop), the atomic save, --keep-last, and
    the one background save in flight under --async-checkpoint."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, every: int, keep_last: int, max_steps: int,
                 sharding: str = "none", asynchronous: bool = False, timeout_s: int = 600):
        self.accelerator, self.run_dir, self.every, self.keep_last = accelerator, Path(run_dir), every, keep_last
        self.max_steps, self.sharding, self.asynchronous = max_steps, sharding, asynchronous
        self.newest: Optional[Path] = None  # the newest complete checkpoint of this run's history
        # a background save's collectives need a group of their own; a synchronous one runs on training's
        # (torch's new_group reads stale addresses after an in-job restart: only async runs pay that)
        self.group = checkpoint_group(timeout_s) if asynchronous else None
        self.pending: Optional[PendingSave] = None

    def select(self, resume: str, log: Callable[[str], None]) -> Tuple[Optional[Path], Optional[dict]]:
        path, meta = select_checkpoint(self.accelerator, self.run_dir, resume, log)
        self.newest = path
        return path, meta

    def due(self, done: int, stopping: bool = False) -> bool:
        return done == self.max_steps or bool(self.every and done % self.every == 0) or stopping

    def save(self, done: int, model, optimizer, *, samples: int, config: dict, progress: dict,
             data_state: Optional[dict], data_identity: Optional[dict] = None) -> None:
        """Save ``done``; in the background under --async-checkpoint, after the previous one completed."""
        self.wait()
        saved = save_checkpoint(self.accelerator, self.run_dir, model, optimizer, step=done, samples=samples,
                                config=config, progress=progress, keep_last=self.keep_last,
                                data_state=data_state, data_identity=data_identity, previous=self.newest,
                                sharding=self.sharding, group=self.group, asynchronous=self.asynchronous)
        if isinstance(saved, PendingSave):
            self.pending = saved
        else:
            self.newest = saved

    def wait(self) -> None:
        """Every rank: the background save in flight is complete (its step-N exists) before this returns;
        its failure on any rank is a RunIOError on every rank."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        problem = pending.finish()
        if _any_rank(self.accelerator, bool(problem)):
            kept = f"kept {self.newest}" if self.newest else "no earlier checkpoint of this run exists"
            error = RunIOError(f"the background checkpoint of step {pending.step} failed: "
                               f"{problem or 'on another process'}; {kept}")
            error.every_rank = bool(problem)
            raise error
        self.newest = pending.final

    def close(self) -> None:
        """The run ends early (an error): let a background save finish on this rank, with no collective."""
        pending, self.pending = self.pending, None
        if pending is not None and self.accelerator.is_main_process:
            problem = pending.finish()
            print(f"distseq: the background checkpoint of step {pending.step} " +
                  (f"was not completed: {problem}" if problem else f"completed: {pending.final}"), flush=True)
        elif pending is not None:
            pending.finish()

    def kept(self) -> str:
        """What an error message says survives."""
        return f"kept {self.newest}" if self.newest else "no checkpoint was written yet"


@dataclass
class Restored:
    step: int
    samples: int
    world_size: int
    data_state: Optional[dict]
    progress: dict


def load_checkpoint(accelerator: Accelerator, path: Path, meta: dict, model, optimizer, group=None) -> Restored:
    """Restore weights, optimizer and (same rank count) this rank's RNG from ``path``, verified already
    by ``select_checkpoint`` (``meta`` is its meta.json). The state reshards: any number of ranks, any
    sharding, loads any checkpoint."""
    try:
        if meta["format_version"] == 1:
            load_whole_state(path / WEIGHTS, path / "trainer_state.pt", model, optimizer)
        else:
            load_state(path / STATE, model, optimizer, group)
    except (RuntimeError, SafetensorError, KeyError, ValueError, OSError, pickle.UnpicklingError,
            CheckpointException) as error:
        raise CheckpointError(f"{path}: cannot load: {_first_line(_cause(error))}") from None
    rank = accelerator.process_index
    rng_file, data_file = path / f"rng-rank{rank}.pt", path / f"data-rank{rank}.json"
    same_world = meta["world_size"] == accelerator.num_processes
    if same_world:
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # a different rank count: per-rank RNG cannot carry over; derive a fresh one per (step, rank)
        torch.manual_seed(derive_seed(meta["config"]["train"]["seed"], meta["step"], rank))
    data_state = json.loads(data_file.read_text()) if data_file.is_file() and same_world else None
    return Restored(meta["step"], meta["samples"], meta["world_size"], data_state, meta.get("progress") or {})
