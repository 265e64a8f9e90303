"""The checkpoint suite: how long a checkpoint blocks the training loop, sync against async, in one run.

The model is a plain stack of ``nn.Linear(W, W)`` (12 x 1024 -> 12.6M fp32 parameters) whose AdamW
has taken one step, so the state is weights + 2 moments: about 151 MB in ``state/``; ``--quick``
uses 4 x 128 (about 0.8 MB), a smoke test of the plumbing whose figures are per-call overheads, not
the headline. One process, the Accelerator of ``fresh_accelerator()``, every file in a temporary
directory (deleted at the end).

- ``sync_block_seconds``: wall time of the checkpoint manager's synchronous ``save`` (DCP write, fsyncs,
  meta.json with every file's sha256, the rename to ``step-N``), median of the repeats, each into a
  step of its own.
- ``async_block_seconds``: wall time until its asynchronous ``save`` returns (the state
  copied to host memory, the background write started); the save is then waited for with the manager's ``wait()``
  outside the timed region (at most one in flight, as in training): ``async_total_seconds`` is the
  time until it is complete. ``async_block_ratio`` = async / sync blocked seconds (goal <= 0.2).
  Saves alternate sync, async after one untimed warm-up of each; nothing trains in between.
- ``save_mb_per_s`` = ``state_mb`` / ``sync_block_seconds``; ``state_mb``: the bytes of ``state/``
  (DCP's ``.metadata`` and the rank's ``.distcp``) / 1e6.
- ``load_mb_per_s`` = ``state_mb`` / the median seconds of the manager's ``restore`` into a fresh model and
  AdamW (built untimed), one process; the checkpoint was just written, so it is read from the page
  cache. ``verify_seconds``: ``read_meta`` (every file's sha256), untimed in the load.
- ``reshard_load_seconds``: ``distseq.checkpoint.dcp.load_state`` on one process (no process group) of a
  ``state/`` written by 2 FSDP ranks (torchrun, gloo, ``fully_shard`` per Linear and the root, one
  AdamW step, ``save_state``); ``reshard_exact``: the loaded weights equal ``whole_weights`` of that
  checkpoint and, with the AdamW moments, the full state the 2 ranks gathered themselves.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

GOAL_KEY = "async_block_ratio"
LR = 1e-3
BATCH = 8
TIMEOUT_S = 300  # the 2-rank save (torchrun)
CONFIG = {"data": {}, "model": {"kind": "linear-stack"}, "optim": {"name": "adamw", "lr": LR}, "train": {}}


@dataclass(frozen=True)
class Sizes:
    """The model measured: ``layers`` x ``nn.Linear(width, width)``; ``repeats`` of each measurement."""

    layers: int
    width: int
    repeats: int


FULL = Sizes(layers=12, width=1024, repeats=5)  # 12,595,200 parameters: ~151 MB of weights + AdamW state
QUICK = Sizes(layers=4, width=128, repeats=3)  # 66,048 parameters: ~0.8 MB


# --- the model (also built by the 2-rank script) ---------------------------------------------------
def build_model(sizes: Sizes, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(sizes.width, sizes.width) for _ in range(sizes.layers)])


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR)


def take_step(model: nn.Module, optimizer: torch.optim.Optimizer, width: int, seed: int) -> None:
    """One AdamW step on a random batch: the optimizer holds both moments (state = 3x the weights)."""
    generator = torch.Generator().manual_seed(seed)
    model(torch.randn(BATCH, width, generator=generator)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trained(sizes: Sizes, seed: int = 0):
    model = build_model(sizes, seed)
    optimizer = adamw(model)
    take_step(model, optimizer, sizes.width, seed)
    return model, optimizer


def untrained(sizes: Sizes, seed: int):
    """A fresh model (other weights than any saved one) and an AdamW without state, to load into."""
    model = build_model(sizes, seed)
    return model, adamw(model)


def full_state(model: nn.Module, optimizer) -> Dict:
    """Weights and optimizer state keyed by parameter names (the layout DCP saves and loads)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state["state"]}


def mismatches(got: Dict, want: Dict, where: str = "") -> List[str]:
    """Where two nested dicts of tensors and values differ (tensors bit for bit)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{where or 'state'}: keys differ"]
        return [m for key in want for m in mismatches(got[key], want[key], f"{where}.{key}" if where else str(key))]
    if isinstance(want, torch.Tensor):
        same = isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got.cpu(), want.cpu())
        return [] if same else [where]
    return [] if got == want else [where]


def tensor_bytes(state: Dict) -> int:
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


def directory_bytes(directory: Path) -> Dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def filesystem(path: Path) -> Dict:
    """The mount that holds ``path`` (its type decides much of the figures: tmpfs, ext4, a network disk)."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best[0]):
                best = (mount, kind, device)
    except OSError:
        pass
    usage = shutil.disk_usage(path)
    return {"mount": best[0], "type": best[1], "device": best[2], "free_gb": usage.free / 1e9}


# --- sync and async saves, loads -------------------------------------------------------------------
def manager(accelerator, run_dir: Path, model, optimizer, asynchronous: bool = False):
    """The checkpoint manager a run would use for this model (no retention: the bench deletes)."""
    from distseq.checkpoint.manager import CheckpointManager
    from distseq.config import CheckpointConfig

    return CheckpointManager(CheckpointConfig(keep_last=0, async_checkpoint=asynchronous), accelerator=accelerator,
                             run_dir=run_dir, max_steps=10**9, samples_per_step=BATCH, model=model,
                             optimizer=optimizer, meta={"config": CONFIG})


class Saver:
    """Checkpoints of one model into ``run_dir`` through the run's checkpoint manager (one synchronous, one
    asynchronous), each into a step of its own; only the newest is kept (older ones are deleted outside
    the timed region)."""

    def __init__(self, accelerator, run_dir: Path, model, optimizer):
        self.run_dir = run_dir
        self.managers = {mode: manager(accelerator, run_dir, model, optimizer, mode) for mode in (False, True)}
        self.step, self.newest = 0, None

    def save(self, asynchronous: bool) -> Dict[str, float]:
        from distseq.checkpoint.format import checkpoint_dir

        self.step += 1
        checkpoints = self.managers[asynchronous]
        started = time.perf_counter()
        checkpoints.save(self.step)
        blocked = time.perf_counter() - started
        checkpoints.wait()  # a failed background write raises here
        total = time.perf_counter() - started
        final = checkpoint_dir(self.run_dir, self.step)
        assert (final / "meta.json").is_file(), final
        if self.newest is not None:
            shutil.rmtree(self.newest)
        self.newest = final
        os.sync()  # the deletion's writes land before the next timed save
        gc.collect()
        return {"blocked": blocked, "total": total}


def compare_saves(saver: Saver, repeats: int, log: Callable[[str], None]) -> Dict:
    """One untimed save of each kind, then ``repeats`` alternating pairs: sync, async."""
    saver.save(False)
    saver.save(True)
    times: Dict[str, list] = {"sync_blocked": [], "async_blocked": [], "async_total": []}
    for repeat in range(repeats):
        sync = saver.save(False)
        pending = saver.save(True)
        times["sync_blocked"].append(sync["blocked"])
        times["async_blocked"].append(pending["blocked"])
        times["async_total"].append(pending["total"])
        log(f"checkpoint: repeat {repeat + 1}/{repeats}: sync {sync['blocked']:.3f} s, async blocks "
            f"{pending['blocked']:.3f} s (complete after {pending['total']:.3f} s)")
    return times


def time_loads(accelerator, path: Path, sizes: Sizes, want: Dict, repeats: int) -> Dict:
    """Median seconds of the checkpoint manager's restore into a fresh model and AdamW; whether the first
    load is exact."""
    from distseq.checkpoint.format import read_meta

    started = time.perf_counter()
    meta, _ = read_meta(path)
    verify = time.perf_counter() - started
    seconds, wrong = [], None
    for repeat in range(repeats):
        model, optimizer = untrained(sizes, seed=1 + repeat)
        gc.collect()
        started = time.perf_counter()
        manager(accelerator, path.parent.parent, model, optimizer).restore(path, meta)
        seconds.append(time.perf_counter() - started)
        if wrong is None:
            wrong = mismatches(full_state(model, optimizer), want)
    return {"seconds": seconds, "verify_seconds": verify, "mismatches": wrong}


# --- the checkpoint of 2 FSDP ranks ----------------------------------------------------------------
RANK_SCRIPT = textwrap.dedent('''
    """One rank of the checkpoint bench's 2-rank save: FSDP2 per Linear and the root, one AdamW step."""
    import os
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from distseq.bench.checkpoint import Sizes, adamw, build_model, take_step
    from distseq.checkpoint.dcp import save_state

    directory, reference, layers, width = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        sizes = Sizes(layers=layers, width=width, repeats=1)
        model = build_model(sizes, seed=0)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = adamw(model)
        take_step(model, optimizer, width, seed=100 + rank)  # each rank its own batch
        save_state(directory, model, optimizer, None, False)
        # the whole state as the ranks hold it, gathered by themselves: what a 1-process load must give
        model_state, optim_state = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"model": model_state, "optim": optim_state["state"]}, reference)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # every file is written and closed, the group destroyed: end without the interpreter's teardown, where
    # a C++ thread left joinable aborts the process now and then ("terminate called without an active
    # exception", about 1 run in 20 on 2 loaded CPUs)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
''')


def save_on_two_ranks(tmp: Path, sizes: Sizes) -> Dict:
    """Run the 2-rank FSDP save with torchrun; its ``state/`` and the gathered reference state."""
    from distseq.distributed.accelerator import free_port

    script, directory, reference = tmp / "rank_save.py", tmp / "fsdp" / "state", tmp / "fsdp" / "reference.pt"
    directory.parent.mkdir(parents=True)
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(directory), str(reference), str(sizes.layers),
               str(sizes.width)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout ends the ranks too
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"the 2-rank FSDP save did not finish in {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the 2-rank FSDP save failed (exit {proc.returncode}): {output.strip()[-1500:]}")
    return {"directory": directory, "reference": reference, "seconds": time.perf_counter() - started}


def reshard(tmp: Path, sizes: Sizes, repeats: int) -> Dict:
    """Median seconds of ``load_state`` on this one process of the 2-rank checkpoint, and exactness."""
    from distseq.checkpoint.dcp import load_state, whole_weights

    written = save_on_two_ranks(tmp, sizes)
    directory = written["directory"]
    seconds, wrong = [], None
    for repeat in range(repeats):
        model, optimizer = untrained(sizes, seed=1 + repeat)
        gc.collect()
        started = time.perf_counter()
        load_state(directory, model, optimizer, None)
        seconds.append(time.perf_counter() - started)
        if wrong is None:
            got = full_state(model, optimizer)
            reference = torch.load(written["reference"], weights_only=True)
            wrong = (mismatches(got["model"], whole_weights(directory), "whole_weights")
                     + mismatches(got, reference, "gathered"))
    files = directory_bytes(directory)
    return {"seconds": seconds, "mismatches": wrong, "state_mb": sum(files.values()) / 1e6, "files": files,
            "save_seconds_with_launch": written["seconds"]}


# --- the suite ------------------------------------------------------------------------------------
def checkpoint_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    return checkpoint_benchmark(QUICK if quick else FULL, quick, log=log)


def checkpoint_benchmark(sizes: Sizes, quick: bool, log: Callable[[str], None] = print,
                         root: Optional[str] = None) -> Dict:
    """Every measurement of the suite, in a temporary directory (``root``: where to make it)."""
    from distseq.distributed.accelerator import fresh_accelerator

    from . import goal_met, machine

    # DCP warns that one process is assumed, from the background thread of every async save too
    warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
    load_before = os.getloadavg()[0]
    accelerator = fresh_accelerator()
    model, optimizer = trained(sizes)
    want = full_state(model, optimizer)
    parameters = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="distseq-bench-checkpoint-", dir=root) as name:
        tmp = Path(name)
        disk = filesystem(tmp)
        saver = Saver(accelerator, tmp / "run", model, optimizer)
        times = compare_saves(saver, sizes.repeats, log)
        files = directory_bytes(saver.newest / "state")
        loads = time_loads(accelerator, saver.newest, sizes, want, sizes.repeats)
        del saver
        resharded = reshard(tmp, sizes, sizes.repeats)
    state_mb = sum(files.values()) / 1e6
    sync, blocked, total = (statistics.median(times[key]) for key in ("sync_blocked", "async_blocked", "async_total"))
    load, reshard_seconds = statistics.median(loads["seconds"]), statistics.median(resharded["seconds"])
    ratio = blocked / sync
    result = {
        "async_block_ratio": ratio,
        "save_mb_per_s": state_mb / sync,
        "load_mb_per_s": state_mb / load,
        "reshard_load_seconds": reshard_seconds,
        "reshard_exact": not resharded["mismatches"],
        "reshard_from_ranks": 2,
        "load_exact": not loads["mismatches"],
        "state_mb": state_mb,
        "state_files_bytes": files,
        "state_tensor_mb": tensor_bytes(want) / 1e6,
        "sync_block_seconds": sync,
        "async_block_seconds": blocked,
        "async_total_seconds": total,
        "load_seconds": load,
        "verify_seconds": loads["verify_seconds"],
        "reshard_state_mb": resharded["state_mb"],
        "reshard_state_files_bytes": resharded["files"],
        "reshard_save_seconds_with_launch": resharded["save_seconds_with_launch"],
        "repeats_seconds": {**times, "load": loads["seconds"], "reshard_load": resharded["seconds"]},
        "mismatches": {"load": loads["mismatches"][:10], "reshard": resharded["mismatches"][:10]},
        "goals": {GOAL_KEY: {"comparison": "<=", "goal": 0.2, "met": goal_met(GOAL_KEY, ratio)}},
        "quick": quick,
        "note": ("async_block_ratio compares only the time the training loop is blocked per checkpoint: the async "
                 "save's background write (async_total_seconds) is not counted, and no training ran while it "
                 "wrote (saves alternate sync, async, one in flight at most). Loads read a checkpoint just "
                 "written (page cache warm); load_seconds excludes read_meta's sha256 check (verify_seconds)."
                 + (" QUICK: a model of under 1 MB of state: these figures are per-call overheads, not the "
                    "headline (>= 100 MB of state in the full run)." if quick else "")),
        "model": {"kind": f"{sizes.layers} x nn.Linear({sizes.width}, {sizes.width})", "parameters": parameters,
                  "dtype": "float32", "optimizer": "AdamW, one step taken (weights + 2 moments)"},
        "sizes": asdict(sizes),
        "machine": machine(),
        "filesystem": disk,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    log(checkpoint_table(result))
    return result


def checkpoint_table(r: Dict) -> str:
    return "\n".join([
        f"checkpoint ({r['model']['kind']}, {r['model']['parameters']:,} parameters, AdamW: {r['state_mb']:.1f} MB "
        f"of state on {r['filesystem']['type']}){' QUICK' if r['quick'] else ''}",
        f"  sync save blocks {r['sync_block_seconds']:.3f} s ({r['save_mb_per_s']:.0f} MB/s); async blocks "
        f"{r['async_block_seconds']:.3f} s, complete after {r['async_total_seconds']:.3f} s",
        f"  async_block_ratio={r['async_block_ratio']:.3f} (goal <= 0.2: "
        f"{'met' if r['goals'][GOAL_KEY]['met'] else 'MISSED'})",
        f"  load {r['load_seconds']:.3f} s ({r['load_mb_per_s']:.0f} MB/s, exact: {r['load_exact']}; sha256 check "
        f"{r['verify_seconds']:.3f} s apart); reshard_load_seconds={r['reshard_load_seconds']:.3f} "
        f"({r['reshard_from_ranks']} FSDP ranks -> 1 process, exact: {r['reshard_exact']})",
    ])

