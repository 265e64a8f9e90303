"""Process-level setup: threads, the precision probe, the Accelerator, and rank-aware printing."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

from .config import TrainConfig
from .errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, ConfigError, StartupStopped
from .precision import Precision

TENSORBOARD_PROJECT = "tensorboard"  # event files go to RUN/tensorboard/
TRACKER_PROJECT = "distseq"  # the MLflow experiment, W&B project, ... of every run (TensorBoard has none)
_RUN_NAME = {"mlflow": "run_name", "wandb": "name"}  # each tracker's keyword for the run's name


def free_port() -> int:
    """A TCP port free on loopback now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def set_cpu_threads() -> None:
    """Give each of N local CPU processes 1/N of the cores unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def fresh_accelerator(**kwargs) -> Accelerator:
    """An Accelerator built from these settings alone. accelerate keeps one state per process and
    refuses other settings later (another precision); an earlier run or eval in this interpreter (a
    notebook, a test, distseq.train called again) must not decide this one's."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # cpu=True on a machine without CUDA: otherwise accelerate leaves every launched rank training alone.
    return Accelerator(cpu=not torch.cuda.is_available(), **kwargs)


def trackers(cfg: TrainConfig) -> list:
    """``--log-with`` for accelerate's ``log_with``. TensorBoard goes by name: accelerate writes it to
    RUN/tensorboard/ (the project name is its directory) and ``start_tracking`` gives it purge_step.
    Every other tracker is accelerate's own class, built here under TRACKER_PROJECT and named after
    the run directory: by name, accelerate would give it TensorBoard's directory as its project."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    run_name = Path(cfg.train.run_dir).resolve().name
    out = []
    for name in cfg.trackers():
        if name == "tensorboard":
            out.append(name)
            continue
        tracker = LOGGER_TYPE_TO_CLASS[name]
        project = os.environ.get("WANDB_PROJECT", TRACKER_PROJECT) if name == "wandb" else TRACKER_PROJECT
        where = (cfg.train.run_dir,) if tracker.requires_logging_directory else ()
        out.append(tracker(project, *where, **({_RUN_NAME[name]: run_name} if name in _RUN_NAME else {})))
    return out


def build_accelerator(cfg: TrainConfig, precision: Precision, sharding: str,
                      broadcast_buffers: bool = True) -> Accelerator:
    """The run's Accelerator. distseq owns the sharding (sharding.py), so accelerate is never given an
    FSDP plugin; under FSDP the precision is FSDP2's policy, so accelerate adds no autocast.
    ``broadcast_buffers``: DDP copies rank 0's buffers to every rank at each forward (a collective inside
    the forward); needed only for buffers a model updates and saves (running statistics)."""
    from .sharding import accelerate_without_fsdp

    with accelerate_without_fsdp():
        return _accelerator(cfg, "no" if sharding == "fsdp" else precision.name, broadcast_buffers)


def _accelerator(cfg: TrainConfig, mixed_precision: str, broadcast_buffers: bool = True) -> Accelerator:
    return fresh_accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=trackers(cfg) or None,
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
    launched = int(os.environ.get("WORLD_SIZE", "1"))
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


class StopSignals:
    """SIGINT, SIGTERM, SIGUSR1 and SIGHUP, from start-up to the end of a run.

    During start-up a signal stops the process at once (``StartupStopped``: nothing was saved yet). Once the
    loop runs it only sets ``received``; every rank agrees on it at the next step boundary, saves and
    exits (130 for SIGINT, 143 for the others, which schedulers send before a preemption; SIGHUP is a
    lost terminal or a batch system's notice). A second SIGINT exits at once: checkpoints are written
    atomically, so the newest complete one stays intact. A signal that the process inherited as ignored
    (``nohup``, a background job of a non-interactive shell) stays ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)

    def __init__(self):
        self.received = 0  # the first signal's number, 0 while none arrived
        self.in_loop = False
        self._previous = {}

    def begin_loop(self) -> None:
        """From here a signal is acted on at the next step boundary (saved), not at once; the handlers
        this one replaced (the command line's, entry.py) learn that training has started."""
        self.in_loop = True
        for handler in self._previous.values():
            getattr(handler, "training_started", lambda: None)()

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.in_loop:
            raise StartupStopped(f"{name} during start-up: stopped before training; nothing was saved",
                                 exit_code(signum))
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            print(f"distseq: second SIGINT: exiting now without saving (the newest complete checkpoint is intact)",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.received = self.received or signum


def exit_code(signum: int) -> int:
    """130 for an interrupt (SIGINT), 143 for a request to stop (SIGTERM, SIGUSR1, SIGHUP)."""
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


def signal_name(signum: int) -> str:
    return signal.Signals(int(signum)).name


def request_requeue() -> str:
    """Ask SLURM to requeue this job; returns what happened, for the log."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not under SLURM (no SLURM_JOB_ID): no requeue"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    return f"scontrol requeue {job}: " + ("ok" if result.returncode == 0 else result.stderr.strip() or "failed")


_COLLECTIVE_FAILURES = ("gloo", "NCCL", "nccl", "Connection reset", "Connection closed", "timed out", "Timed out")


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because a peer died or hung past --dist-timeout-s (not a bug of ours).
    DDP's reducer reports these as a plain RuntimeError carrying the backend's message."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(marker in str(error) for marker in _COLLECTIVE_FAILURES)
    )
