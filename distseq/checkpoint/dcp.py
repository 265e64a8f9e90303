"""The training state (weights and optimizer) as ``torch.distributed.checkpoint`` writes and reads it.

Each rank saves what it holds (whole tensors for one process or DDP replicas, its DTensor shards
under FSDP) into one ``state/`` directory: DCP's ``.metadata`` and one ``__{rank}_0.distcp`` per
rank. Loading reshards: DCP reads, on every rank, the parts its own layout holds, so a checkpoint
of any number of ranks and any sharding loads on any other.

Reading executes no code from the checkpoint: DCP unpickles ``.metadata`` and the optimizer's
non-tensor values (learning rates, betas); here the first goes through an unpickler that admits only
DCP's metadata classes and torch's sizes and dtypes, the second through ``weights_only`` loading.
"""

from __future__ import annotations

import io
import pickle
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load as load_safetensors
from torch.distributed.checkpoint._nested_dict import set_element  # as DefaultLoadPlanner places values
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

STATE = "state"  # the DCP directory inside a checkpoint
# every global a legitimate .metadata names (torch 2.13), exactly: module and name, never a dotted path
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if "." not in name and ((module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"state/.metadata refers to {module}.{name}, which a checkpoint never holds")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader whose ``.metadata`` may name only DCP's own metadata classes."""

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor values with ``weights_only`` (plain Python values only)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def raw_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper (DCP reads and sets its state directly)."""
    return getattr(optimizer, "optimizer", optimizer)


def training_state(model, optimizer) -> dict:
    """``{"model": ..., "optim": ...}`` keyed by parameter names, each rank holding its own part."""
    model_state, optim_state = get_state_dict(model, raw_optimizer(optimizer))
    return {"model": model_state, "optim": optim_state}


def no_dist(group) -> bool:
    """One process without a group: DCP saves and loads alone."""
    return group is None and not dist.is_initialized()


# DCP warns on every single-process save and load (also from an async save's thread) that it assumes
# one process: so it is, here
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")


def checkpoint_group(timeout_s: int):
    """A gloo group of all ranks for DCP's own collectives (plans, write results), apart from
    training's, so that a background save never interleaves with a step's all-reduce; None on one process."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def save_state(directory: Path, model, optimizer, group, asynchronous: bool):
    """Write this rank's part of the state into ``directory`` (fsynced); with ``asynchronous``, return
    DCP's Future as soon as the state is copied to host memory."""
    writer = dcp.FileSystemWriter(directory, sync_files=True)
    state = training_state(model, optimizer)
    if asynchronous:
        return dcp.async_save(state, storage_writer=writer, process_group=group)
    dcp.save(state, storage_writer=writer, process_group=group, no_dist=no_dist(group))
    return None


def load_state(directory: Path, model, optimizer, group) -> None:
    """Fill the model and optimizer, as they lie on this rank, from a saved ``state/``."""
    state = training_state(model, optimizer)
    reader = SafeReader(directory)
    reader.read_metadata()  # its refusal as it is: DCP would fall back to per-rank metadata and hide it
    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), process_group=group, no_dist=no_dist(group))
    set_state_dict(model, raw_optimizer(optimizer), model_state_dict=state["model"], optim_state_dict=state["optim"])


def whole_weights(directory: Path) -> Dict[str, torch.Tensor]:
    """The model's whole tensors from a saved ``state/``, whatever wrote it, read in this one process
    (shapes and dtypes from DCP's metadata)."""
    reader = SafeReader(directory)
    weights = {key[len("model."):]: torch.empty(entry.size, dtype=entry.properties.dtype)
               for key, entry in reader.read_metadata().state_dict_metadata.items()
               if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    dcp.load({"model": weights}, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return weights


def load_whole_state(weights_file: Path, optimizer_file: Path, model, optimizer) -> None:
    """A version-1 checkpoint: whole weights and the optimizer's state keyed by parameter position,
    which becomes keyed by name so that torch places it on any layout (FSDP shards it)."""
    loaded = load_safetensors(Path(weights_file).read_bytes())
    # the model's own order on every rank: under FSDP each tensor is one collective, and safetensors'
    # order differs from process to process
    weights = {name: loaded[name] for name in model.state_dict() if name in loaded}
    weights.update((name, loaded[name]) for name in sorted(loaded) if name not in weights)  # refused by name
    saved = torch.load(optimizer_file, weights_only=True)["optimizer"]
    optim = raw_optimizer(optimizer)
    name_of = {id(p): name for name, p in getattr(model, "module", model).named_parameters()}  # DDP's wrapper
    order = [name_of[id(p)] for group in optim.param_groups for p in group["params"]]
    by_name = {"state": {order[i]: value for i, value in saved["state"].items()},
               "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_state_dict(model, optim, model_state_dict=weights, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))
