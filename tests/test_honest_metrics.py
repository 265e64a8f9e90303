"""What a run reports is true: skipped steps, strict JSON, plain log files, totals across a resume, the API."""

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO, assert_ok, cpu_env, run_main, scalars, summary

from distseq.fsio import write_json
from distseq.training.metrics import Throughput, TrainingClock

ADDING = ["train", "--task", "adding", "--seq-len", "6", "--global-batch-size", "8", "--max-steps", "10",
          "--checkpoint-every", "0", "--eval-every", "0", "--eval-size", "32", "--no-progress"]


def adding_rows(path, rows, bad_rows=()):
    """Rows of the adding task; a label of 1e30 in ``bad_rows`` makes that step's loss overflow."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with open(path, "w") as handle:
        for row in range(rows):
            values = torch.rand(6, generator=generator)
            label = 1e30 if row in bad_rows else float(values[0] + values[4])
            handle.write(json.dumps({"sequence": [[v, float(i in (0, 4))] for i, v in enumerate(values.tolist())],
                                     "label": label}) + "\n")
    return path


@pytest.fixture
def cli(capsys):
    """``distseq ARGS`` in this process: (exit code, stdout, stderr) as a CompletedProcess."""
    return lambda args, **_: run_main(args, capsys)


def strict_load(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}: not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_skipped_steps_never_count_in_the_averages(tmp_path, cli):
    # 8 rows a step: rows 17, 27 and 35 spoil steps 3, 4 and 5
    data = adding_rows(tmp_path / "d.jsonl", 80, bad_rows=(17, 27, 35))
    common = [*ADDING, "--data-files", str(data), "--data-streaming", "--on-nonfinite", "skip",
              "--max-skipped-fraction", "0.5"]
    every_step, every_two = tmp_path / "one", tmp_path / "two"
    assert_ok(cli([*common, "--log-every", "1", "--run-dir", str(every_step)]))
    logged = cli([*common, "--log-every", "2", "--run-dir", str(every_two)])
    assert_ok(logged)
    # the log line names skipped steps only once there are some
    lines = [line for line in logged.stdout.splitlines() if line.startswith("step=") and "train/lr" in line]
    assert ["train/skipped_steps=" in line for line in lines] == [False, True, True, True, True]
    assert ["train/skipped_steps_window=" in line for line in lines] == [False, True, True, False, False]

    one, two = scalars(every_step), scalars(every_two)
    assert [s for s, _ in one["train/loss"]] == [1, 2, 6, 7, 8, 9, 10]  # skipped steps log no loss
    assert [s for s, _ in two["train/loss"]] == [2, 6, 8, 10]  # the window of steps 3-4 was all skipped
    loss_one, loss_two = dict(one["train/loss"]), dict(two["train/loss"])
    assert loss_two[6] == pytest.approx(loss_one[6], rel=1e-6)  # step 5 skipped: the window is step 6 alone
    assert loss_two[2] == pytest.approx((loss_one[1] + loss_one[2]) / 2, rel=1e-6)
    assert dict(two["train/skipped_steps_window"]) == {2: 0, 4: 2, 6: 1, 8: 0, 10: 0}
    assert dict(two["train/skipped_steps"])[10] == 3
    result = strict_load(every_two / "summary.json")
    assert result["skipped_steps"] == 3 and result["status"] == "complete"


def test_a_run_that_mostly_skips_stops(tmp_path, cli):
    data = adding_rows(tmp_path / "d.jsonl", 80, bad_rows=range(80))
    run = tmp_path / "run"
    proc = cli([*ADDING, "--data-files", str(data), "--data-streaming", "--on-nonfinite", "skip", "--log-every", "1",
                        "--run-dir", str(run)])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "distseq train: error: 2 optimizer steps skipped for non-finite values by step 2, more than "
        "--max-skipped-fraction 0.1 of --max-steps 10; stopped without saving"]
    assert not (run / "checkpoints").exists()


def test_summary_is_strict_json_even_when_everything_was_skipped(tmp_path, cli):
    data = adding_rows(tmp_path / "d.jsonl", 80, bad_rows=range(80))
    run = tmp_path / "run"
    assert_ok(cli([*ADDING, "--data-files", str(data), "--data-streaming", "--on-nonfinite", "skip", "--log-every", "5",
                           "--max-skipped-fraction", "1", "--run-dir", str(run)]))
    result = strict_load(run / "summary.json")
    assert result["skipped_steps"] == 10 and result["status"] == "complete"
    assert "train/loss" not in dict(scalars(run))  # nothing was trained: no loss is reported


def test_non_finite_values_are_written_as_null_with_a_note(tmp_path):
    write_json(tmp_path / "s.json", {"eval/loss": float("inf"), "history": [{"loss": float("nan")}], "ok": 1.5})
    loaded = strict_load(tmp_path / "s.json")
    assert loaded["eval/loss"] is None and loaded["history"][0]["loss"] is None and loaded["ok"] == 1.5
    assert loaded["non_finite"]["keys"] == ["eval/loss", "history[0].loss"]


def test_a_log_file_gets_plain_lines_not_progress_frames(tmp_path, cli):
    """stdout and stderr are pipes here, as under sbatch or nohup: no bar unless asked for."""
    proc = cli(["train", "--run-dir", str(tmp_path / "run"), "--max-steps", "40", "--log-every", "10",
                        "--eval-every", "20", "--eval-size", "128", "--hidden-size", "8", "--global-batch-size", "32"])
    assert_ok(proc)
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines if "train/loss=" in line] == [f"step={s}/40" for s in (10, 20, 30, 40)]
    assert lines[0].startswith("distseq: world_size=1") and lines[-4].startswith("distseq: done: step=40")
    forced = cli(["train", "--run-dir", str(tmp_path / "bar"), "--max-steps", "4", "--log-every", "2",
                          "--eval-size", "64", "--hidden-size", "8", "--progress"])
    assert_ok(forced)
    assert "train: 100%" in forced.stderr  # --progress still shows it where asked for


def test_throughput_leaves_out_set_up_and_paused_time():
    clock = TrainingClock(train_before=5.0)
    meter = Throughput(0, 0, 0, clock, flops_per_token=10.0)
    time.sleep(0.2)  # set-up before the first step: wall time, not training time
    assert clock.train_seconds() == 5.0 and clock.wall_seconds() >= 0.2
    clock.begin_training()
    with clock.pause():
        time.sleep(0.3)  # an evaluation or a checkpoint write
    time.sleep(0.01)
    assert 5.01 <= clock.train_seconds() < 5.1
    window = meter.window(1, 100, 1000)
    assert window["perf/step_time_ms"] < 100 and window["perf/samples_per_sec"] > 1000
    assert window["perf/tokens_per_sec"] > 10000
    assert window["perf/model_flops_per_sec"] == pytest.approx(10.0 * window["perf/tokens_per_sec"])
    assert "perf/mfu" not in window  # no known peak: no MFU


def test_the_summary_after_a_resume_covers_the_whole_run(tmp_path, cli):
    run = tmp_path / "run"
    common = ["train", "--run-dir", str(run), "--eval-every", "5", "--eval-size", "64", "--hidden-size", "8",
              "--global-batch-size", "32", "--no-progress", "--log-every", "5"]
    assert_ok(cli([*common, "--max-steps", "10"]))
    first = summary(run)
    assert_ok(cli([*common, "--max-steps", "20"]))
    whole = summary(run)
    assert [e["step"] for e in whole["eval_history"]] == [5, 10, 15, 20]
    assert whole["eval_history"][:2] == first["eval_history"]
    assert whole["train_seconds"] > first["train_seconds"] and whole["wall_seconds"] > first["wall_seconds"]
    assert whole["start_step"] == 0 and whole["samples"] == 20 * 32
    assert whole["steps_per_sec"] == pytest.approx(20 / whole["train_seconds"])


def test_train_can_be_called_again_in_one_interpreter(tmp_path):
    script = (
        "import distseq\n"
        "for i in range(3):\n"
        "    cfg = distseq.TrainConfig()\n"
        f"    cfg.train.run_dir = r'{tmp_path}/run' + str(i)\n"
        "    cfg.train.max_steps, cfg.train.global_batch_size, cfg.data.eval_size = 3, 16, 32\n"
        "    cfg.train.precision = ('auto', 'no', 'auto')[i]\n"
        "    cfg.log.log_every, cfg.model.hidden_size = 3, 8\n"
        "    print('RESULT', distseq.train(cfg)['status'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=cpu_env(), cwd=REPO)
    assert_ok(proc)
    assert proc.stdout.count("RESULT complete") == 3


def test_a_finished_data_files_run_run_again_has_nothing_to_train(tmp_path, cli):
    data = adding_rows(tmp_path / "d.jsonl", 44)
    args = [*ADDING, "--data-files", str(data), "--data-streaming", "--log-every", "1",
            "--run-dir", str(tmp_path / "run")]
    assert_ok(cli(args))
    assert summary(tmp_path / "run")["step"] == 5  # 44 rows // 8
    again = cli(args)  # what a requeue does
    assert_ok(again)
    assert "the data files were used up at step 5; nothing to train" in again.stdout


def test_an_empty_data_file_is_refused_before_anything_runs(tmp_path, cli):
    data = adding_rows(tmp_path / "d.jsonl", 40)
    (tmp_path / "empty.jsonl").write_text("\n")
    run = tmp_path / "run"
    proc = cli([*ADDING, "--data-files", f"{data},{tmp_path / 'empty.jsonl'}", "--run-dir", str(run)])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"distseq train: error: --data-files: {tmp_path / 'empty.jsonl'} has no rows (every file of --data-files "
        f"must hold some)"]
    assert not run.exists()


def test_run_files_are_readable_by_others_as_open_would_make_them(tmp_path):
    import os

    write_json(tmp_path / "summary.json", {"step": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_the_log_line_is_for_people(tmp_path, capsys):
    """Loss, accuracy, lr, grad norm and throughput; what rarely says anything (each rank's own timing on
    one process, zero skipped steps, model FLOP/s) stays in TensorBoard and summary.json only."""
    run = tmp_path / "run"
    proc = run_main(["train", "--max-steps", "4", "--log-every", "2", "--eval-every", "0", "--eval-size", "64",
                     "--no-progress", "--run-dir", run], capsys)
    assert_ok(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step=") and "train/loss" in line]
    assert [[field.split("=")[0] for field in line.split()] for line in lines] == [[
        "step", "train/loss", "train/accuracy", "train/lr", "train/grad_norm", "perf/samples_per_sec",
        "perf/tokens_per_sec", "perf/step_time_ms"]] * 2
    tags = scalars(run)
    assert {"train/skipped_steps", "train/skipped_steps_window", "perf/step_time_ms_min", "perf/step_time_ms_max",
            "perf/slowest_rank", "perf/model_flops_per_sec"} <= set(tags)
    assert strict_load(run / "summary.json")["perf/slowest_rank"] == 0
