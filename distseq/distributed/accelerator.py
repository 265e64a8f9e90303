"""The process and its group: CPU threads, the device, the group joined with each restarted attempt's keys
apart (``join_group``), the Accelerator (never given an FSDP plugin: distseq shards itself,
``sharding.py``), the check that the launch joined the world it promised, rank-aware printing, and what a
failed collective looks like."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import warnings
from datetime import timedelta
from typing import Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

from distseq.config import TrainConfig
from distseq.config.world import launch_world_size
from distseq.errors import ConfigError
from distseq.ops.failpoints import late_restart_seconds


def free_port() -> int:
    """A TCP port free on loopback now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", launch_world_size()))


def set_cpu_threads() -> None:
    """Give each of N local CPU processes 1/N of the cores unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def fresh_accelerator(timeout_s: Optional[int] = None, **kwargs) -> Accelerator:
    """An Accelerator built from these settings alone. accelerate keeps one state per process and
    refuses other settings later (another precision); an earlier run or eval in this interpreter (a
    notebook, a test, distseq.train called again) must not decide this one's. ``timeout_s``: how long the
    process group's collectives may wait (torch's default when None)."""
    from accelerate.state import AcceleratorState, GradientState

    time.sleep(late_restart_seconds())  # a failpoint: 0 unless a test asks for a rank that comes back late
    join_group(timedelta(seconds=timeout_s) if timeout_s else None)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # cpu=True on a machine without CUDA: otherwise accelerate leaves every launched rank training alone.
    return Accelerator(cpu=not torch.cuda.is_available(), **kwargs)


def join_group(timeout: Optional[timedelta]) -> None:
    """Join the launch's process group before accelerate would (accelerate adopts a group that exists) where
    torch elastic's agent hosts the store (``TORCHELASTIC_USE_AGENT_STORE``: torchrun's and accelerate's
    default static rendezvous, and c10d's shared store). That store outlives an attempt: after an in-job
    restart the dead attempt's keys (gloo's addresses, NCCL's unique id) would send a rank to processes that
    are gone ("connectFullMesh failed ... Connection refused"). So each attempt writes under a prefix of its
    own, ``distseq/attempt-N/`` with N the agent's ``TORCHELASTIC_RESTART_COUNT``, which every rank of one
    machine shares. The backend is accelerate's own choice (it is never given an FSDP plugin): NCCL on GPUs,
    gloo on CPUs. Elsewhere (a fresh store per attempt, a launch without torch elastic, one process)
    accelerate joins as before."""
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    if (dist.is_initialized() or launch_world_size() < 2
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True)):
        return
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout or default_pg_timeout))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world_size,
                            store=dist.PrefixStore(f"distseq/attempt-{attempt}/", store), timeout=timeout)


def build_accelerator(cfg: TrainConfig, *, precision: str, sharding: str, log_with: Sequence = (),
                      broadcast_buffers: bool = True) -> Accelerator:
    """The run's Accelerator. distseq owns the sharding (sharding.py), so accelerate is never given an
    FSDP plugin; under FSDP the precision is FSDP2's policy, so accelerate adds no autocast. ``log_with``:
    accelerate's trackers (names or tracker objects). ``broadcast_buffers``: DDP copies rank 0's buffers to
    every rank at each forward (a collective inside the forward); needed only for buffers a model updates
    and saves (running statistics)."""
    from distseq.distributed.sharding import accelerate_without_fsdp

    with accelerate_without_fsdp():
        return fresh_accelerator(
            cfg.train.dist_timeout_s,
            mixed_precision="no" if sharding == "fsdp" else precision,
            gradient_accumulation_steps=cfg.train.grad_accum_steps,
            log_with=list(log_with) or None,
            project_config=ProjectConfiguration(project_dir=cfg.train.run_dir, logging_dir=cfg.train.run_dir),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s)),
                             DistributedDataParallelKwargs(broadcast_buffers=broadcast_buffers)],
        )


def needs_buffer_broadcast(model: torch.nn.Module) -> bool:
    """False when every buffer is left out of the state dict (position tables, masks: constants every rank
    computes alike); buffers that are saved (running statistics a model updates) must stay equal across
    ranks. A model without buffers keeps DDP's default (it broadcasts nothing)."""
    saved = set(model.state_dict())
    buffers = [name for name, _ in model.named_buffers()]
    return not buffers or any(name in saved for name in buffers)


@contextlib.contextmanager
def ddp_without_buffer_notice():
    """torch 2.13 calls ``broadcast_buffers=False`` deprecated in favour of ``forward_sync_buffers``, which
    accelerate's DDP kwargs cannot pass yet; the behaviour distseq asks for (no broadcast at each forward)
    is the same."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        yield


def check_world_size(accelerator: Accelerator, expected: Optional[int]) -> None:
    """Fail when the launch produced another number of processes than asked for.

    Two silent failures are caught: a launcher's WORLD_SIZE that the Accelerator did not join (ranks
    training alone), and --expect-world-size N (say, from a config asking for N) against what started.
    """
    launched = launch_world_size()
    got = accelerator.num_processes
    if launched != got:
        raise ConfigError("--expect-world-size", f"the launcher started {launched} processes but they joined "
                                                 f"{got} group(s) of {got}: every rank would train alone")
    if expected is not None and got != expected:
        hint = (" (on a CPU machine, `accelerate launch --cpu --num_processes N` and `distributed_type: MULTI_CPU` "
                "start one process: use --multi_gpu, see accelerate_configs/cpu_2proc.yaml)"
                if accelerator.device.type == "cpu" else "")
        raise ConfigError("--expect-world-size", f"asked for {expected} processes, the launch produced {got}{hint}")


def show_progress(requested: Optional[bool]) -> bool:
    """--progress / --no-progress, else a bar only where a person watches: stdout and stderr are
    terminals. A log file (sbatch, nohup, a pipe) gets plain lines, never bar frames."""
    if requested is not None:
        return requested
    return sys.stdout.isatty() and sys.stderr.isatty()


def print0(accelerator: Accelerator, *args) -> None:
    """print on the main process only (to the sys.stdout of the moment, which notebooks and tests swap)."""
    if accelerator.is_main_process:
        print(*args, flush=True)


_COLLECTIVE_FAILURES = ("gloo", "NCCL", "nccl", "Connection reset", "Connection closed", "timed out", "Timed out")


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because a peer died or hung past --dist-timeout-s (not a bug of ours).
    DDP's reducer reports these as a plain RuntimeError carrying the backend's message."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(marker in str(error) for marker in _COLLECTIVE_FAILURES)
    )
