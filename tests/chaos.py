"""Chaos run: SIGKILL a training run at random moments until it has survived N kills, then let it
finish and compare its final weights, bit for bit, with an uninterrupted run of the same config.

    .venv/bin/python tests/chaos.py --kills 20
    .venv/bin/python tests/chaos.py --kills 10 --processes 2 --sharding fsdp --async-checkpoint

Prints one JSON line: kills tried, kills that landed while the run was alive, checkpoints resumed
from, and whether the final weights are bit-identical. Exit 0 only if they are.
"""

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from conftest import checkpoint_weights  # tests/ is this script's directory: on sys.path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kills to survive (default 20)")
    parser.add_argument("--steps", type=int, default=20000, help="optimizer steps of the run (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times (default 0)")
    parser.add_argument("--processes", type=int, default=1, help="ranks under torchrun (default 1: no launcher)")
    parser.add_argument("--sharding", default="auto", help="--sharding of the runs (default auto)")
    parser.add_argument("--async-checkpoint", action="store_true", help="save in the background")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
              "--master_addr", "127.0.0.1", "--master_port", "29731"] if args.processes > 1 else [sys.executable]
    train = [*launch, "-m", "distseq.cli", "train", "--max-steps", str(args.steps), "--checkpoint-every", "7",
             "--keep-last", "2", "--log-every", "50", "--eval-every", "0", "--eval-size", "64",
             "--global-batch-size", "64", "--hidden-size", "32", "--no-progress", "--sharding", args.sharding,
             *(["--async-checkpoint"] if args.async_checkpoint else [])]
    final = f"checkpoints/step-{args.steps:08d}"  # a step-N directory exists only when complete
    with tempfile.TemporaryDirectory() as tmp:
        reference, chaos = Path(tmp) / "reference", Path(tmp) / "chaos"
        subprocess.run([*train, "--run-dir", str(reference)], env=env, check=True, capture_output=True)
        landed, resumed = 0, 0
        for kill in range(args.kills):
            proc = subprocess.Popen([*train, "--run-dir", str(chaos)], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
            time.sleep(rng.uniform(1.0, 8.0))  # start-up takes ~3 s: some kills land before training starts
            if proc.poll() is None:
                # the launcher and every rank at once (torchrun puts ranks in sessions of their own)
                for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.send_signal(signal.SIGKILL)
                landed += 1
            out, _ = proc.communicate()
            resumed += "resuming from" in out
            if (chaos / final).exists():
                break
        out = subprocess.run([*train, "--run-dir", str(chaos)], env=env, check=True, capture_output=True, text=True)
        a, b = checkpoint_weights(reference / final), checkpoint_weights(chaos / final)
        identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(json.dumps({"kills_tried": kill + 1, "kills_landed": landed, "runs_that_resumed": resumed,
                          "steps": args.steps, "processes": args.processes, "sharding": args.sharding,
                          "async_checkpoint": args.async_checkpoint, "bit_identical": identical}))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
