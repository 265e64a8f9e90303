"""``CheckpointManager``: everything a run does with its checkpoints, and when.

It owns ``RUN/checkpoints`` for one run: the checkpoint the run resumes from (chosen by the main
process, verified once), whether a step saves (every --checkpoint-every steps, the last step, a stop),
the atomic save (``writer.py``), --keep-last, and the one background save in flight under
--async-checkpoint. What it saves is the model and optimizer (through DCP, resharding on load) and a
mapping of stateful objects (``state_dict()`` / ``load_state_dict()``): ``shared`` ones, the same on
every rank, go into ``meta.json`` under their name (the run's progress); ``per_rank`` ones into
``{name}-rank{r}.pt`` (the RNG, a streamed file's position), restored when the world size is the same.
New state is one more entry, not a new signature. The learning-rate schedule is not stored: it is a
function of the step and the options.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from distseq.checkpoint.dcp import STATE, checkpoint_group, load_state, load_whole_state
from distseq.checkpoint.format import (
    FORMAT_VERSION,
    WEIGHTS,
    _cause,
    _first_line,
    checkpoint_dir,
    newest_verified,
    read_meta,
    versions,
)
from distseq.checkpoint.writer import PendingSave, write_checkpoint
from distseq.config import CheckpointConfig
from distseq.distributed.agree import any_rank, main_decides
from distseq.errors import CheckpointError, RunIOError
from distseq.registry import PLUGINS


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class RngState:
    """This process's random number generators: the CPU's, and the GPU's where there is one."""

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@dataclass
class Restored:
    """What a resume restored: the checkpoint's step, samples and world size, and which per-rank states
    it loaded (none when the world size differs: they belong to ranks that no longer exist as they were)."""

    step: int
    samples: int
    world_size: int
    per_rank: List[str] = field(default_factory=list)


class CheckpointManager:
    """The run's checkpoints: which to resume from, when to save, the save itself, retention, and the
    background save in flight. Built from the checkpoint section plus the run's objects, by keyword."""

    def __init__(self, cfg: CheckpointConfig, *, accelerator: Accelerator, run_dir: Path, max_steps: int,
                 samples_per_step: int, model, optimizer, sharding: str = "none", timeout_s: int = 600,
                 meta: Optional[Dict[str, Any]] = None, shared: Optional[Dict[str, Stateful]] = None,
                 per_rank: Optional[Dict[str, Stateful]] = None):
        self.accelerator, self.run_dir, self.every, self.keep_last = accelerator, Path(run_dir), \
            cfg.checkpoint_every, cfg.keep_last
        self.max_steps, self.samples_per_step, self.sharding = max_steps, samples_per_step, sharding
        self.asynchronous = cfg.async_checkpoint
        self.model, self.optimizer = model, optimizer
        self.meta = dict(meta or {})  # constant entries of meta.json (the config, the data's identity)
        self.shared: Dict[str, Stateful] = dict(shared or {})
        self.per_rank: Dict[str, Stateful] = dict(per_rank or {})
        self.newest: Optional[Path] = None  # the newest complete checkpoint of this run's history
        # a background save's collectives need a group of their own; a synchronous one runs on training's
        self.group = checkpoint_group(timeout_s) if self.asynchronous else None
        self.pending: Optional[PendingSave] = None

    # --- resuming --------------------------------------------------------------------------------
    def select(self, resume: str, log: Callable[[str], None]) -> Tuple[Optional[Path], Optional[dict]]:
        """The checkpoint to resume from and its verified meta.json, chosen on the main process and shared
        with every rank. ``never``: none. ``auto``: the newest under RUN/checkpoints whose manifest
        verifies (damaged ones are reported and skipped; one deleted under the reader is looked for
        again). A path: that checkpoint, or a CheckpointError."""

        def choose() -> Tuple[Optional[str], Optional[dict]]:
            if resume == "never":
                return None, None
            path, meta = (newest_verified(self.run_dir, log)[:2] if resume == "auto"
                          else (Path(resume), read_meta(Path(resume))[0]))
            return (str(path) if path else None), meta

        path, meta = main_decides(self.accelerator, choose)
        self.newest = Path(path) if path else None
        return self.newest, meta

    def restore(self, path: Path, meta: dict) -> Restored:
        """Load the model, optimizer, shared and (same world size) per-rank states from ``path``, verified
        already by ``select`` (``meta`` is its meta.json). The model and optimizer reshard: any number of
        ranks, any sharding, loads any checkpoint."""
        try:
            if meta["format_version"] == 1:
                load_whole_state(path / WEIGHTS, path / "trainer_state.pt", self.model, self.optimizer)
            else:
                load_state(path / STATE, self.model, self.optimizer, self.group)
        except (RuntimeError, SafetensorError, KeyError, ValueError, OSError, pickle.UnpicklingError,
                CheckpointException) as error:
            raise CheckpointError(f"{path}: cannot load: {_first_line(_cause(error))}") from None
        for name, obj in self.shared.items():
            obj.load_state_dict(meta.get(name) or {})
        restored = Restored(meta["step"], meta["samples"], meta["world_size"])
        if meta["world_size"] == self.accelerator.num_processes:
            rank = self.accelerator.process_index
            for name, obj in self.per_rank.items():
                state = _rank_state(path, name, rank)
                if state is not None:
                    obj.load_state_dict(state)
                    restored.per_rank.append(name)
        return restored

    # --- saving ----------------------------------------------------------------------------------
    def due(self, done: int, stopping: bool = False) -> bool:
        return done == self.max_steps or bool(self.every and done % self.every == 0) or stopping

    def save(self, done: int) -> None:
        """Save step ``done``; in the background under --async-checkpoint, after the previous one completed."""
        self.wait()
        rank = self.accelerator.process_index
        rank_files = {f"{name}-rank{rank}.pt": _torch_bytes(state) for name, state in
                      ((name, obj.state_dict()) for name, obj in self.per_rank.items()) if state is not None}
        meta = {"format_version": FORMAT_VERSION, "step": done, "samples": done * self.samples_per_step,
                "world_size": self.accelerator.num_processes, "sharding": self.sharding, **self.meta,
                **{name: obj.state_dict() for name, obj in self.shared.items()},
                "plugins": list(PLUGINS),  # what eval, predict, export and load_model import again
                "versions": versions()}
        saved = write_checkpoint(self.accelerator, checkpoint_dir(self.run_dir, done), model=self.model,
                                 optimizer=self.optimizer, rank_files=rank_files, meta=meta, previous=self.newest,
                                 keep_last=self.keep_last, group=self.group, asynchronous=self.asynchronous)
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
        if any_rank(self.accelerator, bool(problem)):
            error = RunIOError(f"the background checkpoint of step {pending.step} failed: "
                               f"{problem or 'on another process'}; {self.kept()}")
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


def _rank_state(path: Path, name: str, rank: int) -> Optional[Any]:
    """A per-rank state as saved, None when this checkpoint has none (``data-rank{r}.json``: the form
    streamed files' positions had before per-rank states were .pt files)."""
    file = path / f"{name}-rank{rank}.pt"
    if file.is_file():
        return torch.load(file, weights_only=True)
    legacy = path / f"{name}-rank{rank}.json"
    return json.loads(legacy.read_text()) if legacy.is_file() else None
