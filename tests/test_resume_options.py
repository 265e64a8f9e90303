"""Resume honours what the user changed; the schedule is placed in O(1); fresh runs never mix with old ones."""

import json
import time

import pytest
import torch
from conftest import assert_ok, checkpoint_training_state, run_here, run_main, scalars, summary, weights_at

from distseq import TrainConfig
from distseq.config import OptimConfig
from distseq.training.optim import apply_options, build_optimizer, lr_factor

BASE = ["train", "--hidden-size", "16", "--global-batch-size", "32", "--log-every", "5", "--eval-every", "0",
        "--eval-size", "64", "--checkpoint-every", "10", "--no-progress", "--precision", "no", "--warmup-steps", "4"]


def expected_lr(step, max_steps, **optim):
    cfg = OptimConfig(warmup_steps=4, **optim)
    return cfg.lr * lr_factor(cfg, max_steps)(step)


@pytest.fixture(scope="module")
def first_half(tmp_path_factory):
    """10 steps at --lr 0.003, the run every resume below continues from (copied)."""
    run = tmp_path_factory.mktemp("half") / "run"
    assert_ok(run_here([*BASE, "--run-dir", str(run), "--max-steps", "10", "--lr", "0.003"]))
    return run


@pytest.fixture
def cli(capsys):
    """``distseq ARGS`` in this process: (exit code, stdout, stderr) as a CompletedProcess."""
    return lambda args, **_: run_main(args, capsys)


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_changed_options_take_effect_from_the_resumed_step(first_half, tmp_path, cli):
    same = copy_run(first_half, tmp_path / "same")
    changed = copy_run(first_half, tmp_path / "changed")
    assert_ok(cli([*BASE, "--run-dir", str(same), "--max-steps", "20", "--lr", "0.003"]))
    proc = cli([*BASE, "--run-dir", str(changed), "--max-steps", "20", "--lr", "0.03",
                        "--weight-decay", "0.1", "--log-every", "1"])
    assert_ok(proc)
    assert "--lr 0.003 -> 0.03 from step 10" in proc.stdout
    assert "--weight-decay 0.0 -> 0.1 from step 10" in proc.stdout
    assert "--max-steps 10 -> 20 from step 10" in proc.stdout

    lrs = dict(scalars(changed)["train/lr"])
    for step in (11, 15, 20):  # logged after the step: the rate for the next one
        assert lrs[step] == pytest.approx(expected_lr(step, 20, lr=0.03), rel=1e-6), step
    _, saved = checkpoint_training_state(changed / "checkpoints" / "step-00000020")
    assert saved.param_groups[0]["weight_decay"] == 0.1 and saved.param_groups[0]["initial_lr"] == 0.03
    assert saved.param_groups[0]["lr"] == pytest.approx(expected_lr(20, 20, lr=0.03), rel=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(weights_at(same, 20).values(), weights_at(changed, 20).values()))

    # config.json is what ran; config_history.json and the summary keep how it got there
    assert json.loads((changed / "config.json").read_text())["optim"]["lr"] == 0.03
    history = json.loads((changed / "config_history.json").read_text())
    assert history[0]["step"] == 0 and history[0]["config"]["optim"]["lr"] == 0.003
    assert history[1] == {"step": 10, "changes": {"optim.lr": [0.003, 0.03], "optim.weight_decay": [0.0, 0.1],
                                                  "train.max_steps": [10, 20], "log.log_every": [5, 1]}}
    assert summary(changed)["config_changes"] == history[1:]


def test_schedule_values():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    f = lr_factor(cfg, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # past the end: the floor
    constant = lr_factor(OptimConfig(lr=1.0, warmup_steps=0, schedule="constant"), 100)
    assert constant(0) == constant(99) == 1.0


def test_the_schedule_is_placed_at_any_step_in_constant_time():
    model = torch.nn.Linear(2, 1)
    cfg = TrainConfig().optim
    optimizer, scheduler = build_optimizer(model, cfg, 10**17)
    started = time.perf_counter()
    apply_options(optimizer, scheduler, cfg, 10**16)
    assert time.perf_counter() - started < 0.01
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(cfg, 10**17)(10**16))
    optimizer.step()
    scheduler.step()
    assert scheduler.last_epoch == 10**16 + 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(cfg, 10**17)(10**16 + 1))


def test_start_step_far_into_the_stream_starts_at_once(tmp_path, cli):
    start = 10**15
    run = tmp_path / "run"
    proc = cli(["train", "--hidden-size", "8", "--global-batch-size", "32", "--no-progress",
                        "--eval-size", "64", "--log-every", "1", "--start-step", str(start), "--max-steps",
                        str(start + 2), "--resume", "never", "--run-dir", str(run)], timeout=60)
    assert_ok(proc)
    result = summary(run)
    assert result["step"] == start + 2 and result["start_step"] == start and result["samples"] == (start + 2) * 32
    assert result["steps_per_sec"] > 0 and result["status"] == "complete"
    lrs = dict(scalars(run)["train/lr"])
    cfg = TrainConfig().optim
    assert lrs[start + 1] == pytest.approx(cfg.lr * lr_factor(cfg, start + 2)(start + 1), rel=1e-6)


def test_resume_never_refuses_an_earlier_run(first_half, tmp_path, cli):
    run = copy_run(first_half, tmp_path / "run")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = cli([*BASE, "--run-dir", str(run), "--max-steps", "4", "--resume", "never"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"distseq train: error: --resume: never: {run} holds an earlier run (checkpoints, config.json, "
        f"config_history.json, summary.json, ...); use a new --run-dir, or add --overwrite to move it aside first"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_overwrite_moves_the_earlier_run_aside(first_half, tmp_path, cli):
    """The reported bug: a shorter fresh run in a dir with a longer finished one lost its checkpoints to
    --keep-last and the next auto resume adopted the old weights."""
    run = copy_run(first_half, tmp_path / "run")
    old_weights = weights_at(run, 10)
    proc = cli([*BASE, "--run-dir", str(run), "--max-steps", "4", "--checkpoint-every", "1",
                        "--keep-last", "2", "--resume", "never", "--overwrite", "--seed", "1"])
    assert_ok(proc)
    asides = list(tmp_path.glob("run.replaced-*"))
    assert len(asides) == 1 and f"moved the earlier run in {run} aside to {asides[0]}" in proc.stdout
    assert sorted(p.name for p in (asides[0] / "checkpoints").iterdir()) == ["step-00000010"]  # nothing lost
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    assert summary(run)["step"] == 4 and summary(run)["resumed_from"] is None
    again = cli([*BASE, "--run-dir", str(run), "--max-steps", "6", "--seed", "1"])
    assert_ok(again)
    assert f"resuming from {run / 'checkpoints' / 'step-00000004'}" in again.stdout
    assert any(not torch.equal(a, b) for a, b in zip(old_weights.values(), weights_at(run, 6).values()))


def test_resume_path_refuses_a_dir_with_later_checkpoints(first_half, tmp_path, cli):
    run = copy_run(first_half, tmp_path / "run")
    assert_ok(cli([*BASE, "--run-dir", str(run), "--max-steps", "20", "--keep-last", "0"]))
    proc = cli([*BASE, "--run-dir", str(run), "--max-steps", "20",
                        "--resume", str(run / "checkpoints" / "step-00000010")])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "holds checkpoints past" in proc.stderr and "(newest step-00000020)" in proc.stderr


def test_a_finished_run_run_again_has_nothing_to_train(first_half, tmp_path, cli):
    run = copy_run(first_half, tmp_path / "run")
    proc = cli([*BASE, "--run-dir", str(run), "--max-steps", "10", "--lr", "0.003"])
    assert_ok(proc)
    assert "already at step 10 >= --max-steps 10; nothing to train" in proc.stdout
    assert summary(run)["status"] == "complete"


def test_a_checkpoint_copied_under_any_name_resumes(first_half, tmp_path, cli):
    import shutil

    best = tmp_path / "step-best"
    shutil.copytree(first_half / "checkpoints" / "step-00000010", best)
    proc = cli([*BASE, "--run-dir", str(tmp_path / "run"), "--max-steps", "12", "--lr", "0.003", "--resume", str(best)])
    assert_ok(proc)
    assert f"resuming from {best} (step 10," in proc.stdout and summary(tmp_path / "run")["step"] == 12


def test_a_requeued_start_step_job_resumes(tmp_path, cli):
    args = [*BASE, "--run-dir", str(tmp_path / "run"), "--start-step", "5", "--checkpoint-every", "2"]
    assert_ok(cli([*args, "--max-steps", "8"]))  # a fresh start at step 5
    again = cli([*args, "--max-steps", "10"])  # the same command, as a requeue runs it
    assert_ok(again)
    assert "(step 8, 256 samples" in again.stdout and "--start-step 5 applies to a fresh start only" in again.stdout
    result = summary(tmp_path / "run")
    assert result["step"] == 10 and result["start_step"] == 5


def test_a_summary_lost_after_the_last_checkpoint_is_rebuilt(first_half, tmp_path, cli):
    run = copy_run(first_half, tmp_path / "run")
    (run / "summary.json").unlink()  # killed after the final checkpoint, before the summary
    proc = cli([*BASE, "--run-dir", str(run), "--max-steps", "10", "--lr", "0.003"])
    assert_ok(proc)
    rebuilt = summary(run)
    assert rebuilt["step"] == 10 and rebuilt["status"] == "complete" and rebuilt["samples"] == 10 * 32
    assert "rebuilt from the checkpoint" in rebuilt["note"]
    # throughput from what the checkpoint carried: its tokens over its training seconds
    assert rebuilt["tokens"] == 10 * 32 * 10 and rebuilt["tokens_per_sec"] > 0  # 10 steps x 32 samples x seq 10
    assert rebuilt["tokens_per_sec"] == pytest.approx(rebuilt["tokens"] / rebuilt["train_seconds"])
