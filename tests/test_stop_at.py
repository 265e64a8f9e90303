"""--stop-at METRIC>=VALUE: a run ends at the first evaluation where the condition holds, saved, with
stopped_at in summary.json and exit 0; the same step on 1 and 2 processes and across a resume."""

import json

import pytest
from conftest import accelerate_launch, assert_ok, run_here, summary, two_process_args

from distseq.config.threshold import Threshold
from distseq.inference.export import model_from_checkpoint

RUN = ["train", "--seq-len", "6", "--hidden-size", "16", "--global-batch-size", "32", "--max-steps", "40",
       "--eval-every", "4", "--eval-size", "256", "--log-every", "4", "--no-progress", "--precision", "no",
       "--log-with", "none", "--lr", "0.01", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def unstopped(tmp_path_factory):
    """The run without --stop-at, and a condition that first holds at a middle evaluation: the accuracy
    halfway between a new best and the best before it (so no evaluation sits on the boundary)."""
    run = tmp_path_factory.mktemp("unstopped") / "run"
    assert_ok(run_here([*RUN, "--run-dir", str(run)]))
    history = summary(run)["eval_history"]
    for i in range(2, len(history) - 1):
        before = max(entry["eval/accuracy"] for entry in history[:i])
        if history[i]["eval/accuracy"] > before:
            threshold = (before + history[i]["eval/accuracy"]) / 2
            return history, f"eval/accuracy>={threshold:.6f}", history[i]["step"]
    pytest.fail(f"no new best accuracy in the middle of {[e['eval/accuracy'] for e in history]}")


def test_a_run_stops_at_the_first_evaluation_where_the_condition_holds(unstopped, tmp_path):
    history, condition, step = unstopped
    run = tmp_path / "run"
    proc = run_here([*RUN, "--stop-at", condition, "--run-dir", str(run)])
    assert_ok(proc)
    result = summary(run)
    accuracy = next(e["eval/accuracy"] for e in history if e["step"] == step)
    assert result["step"] == step and result["status"] == "complete"
    said = str(Threshold.parse(condition, "binary"))
    assert result["stopped_at"] == {"step": step, "condition": said, "eval/accuracy": accuracy}
    assert [e["step"] for e in result["eval_history"]] == [e["step"] for e in history if e["step"] <= step]
    assert (run / "checkpoints" / f"step-{step:08d}").is_dir()  # saved where it stopped
    model, _, _ = model_from_checkpoint(run / "checkpoints" / f"step-{step:08d}")
    assert result["parameters"] == sum(p.numel() for p in model.parameters())  # what a sweep's report shows
    assert f"distseq: --stop-at {said} holds at step {step} (eval/accuracy={accuracy:.6g})" in proc.stdout

    # the same command again: nothing to train, the same summary, exit 0
    again = run_here([*RUN, "--stop-at", condition, "--run-dir", str(run)])
    assert_ok(again)
    assert "nothing to train" in again.stdout and summary(run)["stopped_at"] == result["stopped_at"]
    # without --stop-at (or with another that does not hold) training goes on to --max-steps
    assert_ok(run_here([*RUN, "--run-dir", str(run)]))
    assert summary(run)["step"] == 40 and "stopped_at" not in summary(run)


def test_the_stop_is_at_the_same_step_across_a_resume(unstopped, tmp_path):
    history, condition, step = unstopped
    run = tmp_path / "run"
    first = [a if a != "40" else str(step - 4) for a in RUN]  # ends one evaluation before the condition holds
    assert_ok(run_here([*first, "--stop-at", condition, "--run-dir", str(run)]))
    assert "stopped_at" not in summary(run)
    assert_ok(run_here([*RUN, "--stop-at", condition, "--run-dir", str(run)]))
    assert summary(run)["stopped_at"]["step"] == step and summary(run)["step"] == step


@pytest.mark.multiproc
def test_the_stop_is_at_the_same_step_on_two_processes(unstopped, tmp_path):
    _, condition, step = unstopped
    run = tmp_path / "run"
    assert_ok(accelerate_launch(two_process_args(), [*RUN, "--stop-at", condition, "--run-dir", str(run)]))
    result = summary(run)
    assert result["world_size"] == 2 and result["stopped_at"]["step"] == step and result["step"] == step


@pytest.mark.parametrize("value, extra, message", [
    ("accuracy>0.9", [], "--stop-at: expected METRIC>=VALUE or METRIC<=VALUE, e.g. 'eval/accuracy>=0.99' or "
                         "'eval/loss<=0.05' (got 'accuracy>0.9')"),
    ("eval/acc>=0.9", [], "--stop-at: 'eval/acc' is not an evaluation metric of a 'binary' task (choose from "
                          "eval/loss, eval/accuracy)"),
    ("eval/sequence_accuracy>=1", [], "--stop-at: 'eval/sequence_accuracy' is not an evaluation metric of a "
                                      "'binary' task (choose from eval/loss, eval/accuracy)"),
    ("eval/loss<=nan", [], "--stop-at: 'nan' is not a finite number"),
    ("eval/loss<=0.1", ["--eval-every", "0"], "--stop-at: is checked at evaluations; --eval-every 0 evaluates only "
                                              "at the end (set --eval-every N)"),
])
def test_a_bad_stop_at_is_one_line(value, extra, message, tmp_path):
    proc = run_here([*RUN, "--stop-at", value, *extra, "--run-dir", str(tmp_path / "run")])
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"distseq train: error: {message}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_config_files_stop_at_is_validated_like_the_flag(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train": {"stop_at": "eval/accuracy=>1"}}))
    proc = run_here(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")])
    assert proc.returncode == 2 and "--stop-at: expected METRIC>=VALUE" in proc.stderr
