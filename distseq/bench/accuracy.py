"""The time-to-accuracy suite: the ``default`` preset against the original example's recipe, in one run.

Both curves are held-out accuracy against training seconds (evaluation pauses are not counted on
either side). ``time_to_99_s`` is the training time at the first evaluation (every 50 steps) with
accuracy >= 0.99; ``seed_recipe_seconds`` and ``seed_recipe_accuracy`` are the plain script's 10 epochs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

TARGET = 0.99
EVAL_EVERY = 50


def first_time_at(history: list, target: float) -> Optional[float]:
    return next((point["train_seconds"] for point in history if point["eval/accuracy"] >= target), None)


def accuracy_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    from distseq.config import preset
    from distseq.training.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset("default")
        cfg.train.run_dir, cfg.train.eval_every, cfg.log.progress = tmp, EVAL_EVERY, False
        cfg.checkpoint.resume = "never"
        result = train(cfg)
    history = result["eval_history"]
    script = Path(__file__).with_name("seed_recipe.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed: {proc.stderr.strip()[-600:]}")
    recipe = json.loads(proc.stdout.strip().splitlines()[-1])
    time_to_target = first_time_at(history, TARGET)
    log(f"  default preset: {TARGET} held-out accuracy after "
        + (f"{time_to_target:.2f} s of training" if time_to_target is not None else "never (within the preset's steps)")
        + f"; seed recipe: {recipe['accuracy']:.4f} after {recipe['seconds']:.2f} s")
    return {
        "time_to_99_s": time_to_target,
        "seed_recipe_seconds": recipe["seconds"],
        "seed_recipe_accuracy": recipe["accuracy"],
        "default_final_accuracy": result["eval/accuracy"],
        "default_train_seconds": result["train_seconds"],
        "default_precision": result["precision"],
        "default_curve": [{"step": p["step"], "train_seconds": p["train_seconds"], "accuracy": p["eval/accuracy"]}
                          for p in history],
        "seed_recipe_curve": recipe["curve"],
    }
