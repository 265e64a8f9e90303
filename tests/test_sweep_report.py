"""The sweep report, on sweep directories written by hand (no training): results.csv/json row by row, the
three tables cell by cell, the points not complete shown with their reasons, the PNGs, a partial sweep."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from distseq.errors import ConfigError
from distseq.sweep.layout import FAILURE, MANIFEST
from distseq.sweep.report import PLOTS_HINT, add_arguments, build_report, report_command

PNG = b"\x89PNG\r\n\x1a\n"
AXES = {"kind": ["lstm", "decoder"], "hidden_size": [16, 32], "lr": [0.001, 0.01], "seed": [0, 1]}
# (kind, hidden_size, lr) -> per seed: (best eval/accuracy, step it reached 0.9 or None), "failed", "interrupted",
# or "pending"
GRID = {
    ("lstm", 16, 0.001): [(0.60, None), (0.64, None)],
    ("lstm", 16, 0.01): [(0.80, None), "failed"],
    ("lstm", 32, 0.001): [(0.70, None), (0.74, None)],
    ("lstm", 32, 0.01): [(0.92, 40), (0.96, 20)],
    ("decoder", 16, 0.001): [(0.50, None), (0.52, None)],
    ("decoder", 16, 0.01): [(0.95, 30), (0.91, 50)],
    ("decoder", 32, 0.001): ["interrupted", "pending"],
    ("decoder", 32, 0.01): [(0.99, 10), (0.97, 20)],
}
FAILED_REASON = "exit 1: --on-nonfinite stop: the loss is NaN at step 12"


def point_name(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items())


def history(best: float, reached):
    """Evaluations every 10 steps: up to the step that reached 0.9 (--stop-at ended it there), else three
    with the best in the middle, so that the final one is below the best."""
    if reached:
        accs = [round(best - 0.1 * (reached - step) / 10, 4) for step in range(10, reached + 1, 10)]
    else:
        accs = [round(best - 0.1, 4), best, round(best - 0.02, 4)]
    return [{"step": 10 * (i + 1), "train_seconds": 1.5 * 10 * (i + 1), "eval/accuracy": acc,
             "eval/loss": round(1 - acc, 4), "eval/samples": 64} for i, acc in enumerate(accs)]


def summary(overrides: dict, best: float, reached) -> dict:
    evals = history(best, reached)
    last = evals[-1]
    out = {"status": "complete", "step": last["step"], "eval/accuracy": last["eval/accuracy"],
           "eval/loss": last["eval/loss"], "eval/samples": 64, "eval_history": evals,
           "train_seconds": last["train_seconds"], "tokens": 1000 * last["step"],
           "parameters": 100 * overrides["hidden_size"] + (7 if overrides["kind"] == "decoder" else 0),
           "model": overrides["kind"], "task": "mqar"}
    if reached:
        out["stopped_at"] = {"step": reached, "condition": "eval/accuracy>=0.9", "eval/accuracy": best}
    return out


def write_point(sweep: Path, overrides: dict, state) -> None:
    run = sweep / point_name(overrides)
    if state == "pending":
        return
    run.mkdir()
    (run / "config.json").write_text("{}")
    if state == "failed":
        (run / FAILURE).write_text(json.dumps({"exit_code": 1, "reason": FAILED_REASON}))
    elif state == "interrupted":  # a preemption saved at step 10 and wrote its summary on the way out
        (run / "summary.json").write_text(json.dumps({"status": "preempted", "step": 10,
                                                      "eval_history": history(0.9, None)[:1]}))
    else:
        (run / "summary.json").write_text(json.dumps(summary(overrides, *state)))


def write_sweep(root: Path, points: list, axes: dict, stop_at) -> Path:
    """The manifest a sweep writes and each point's files; ``points``: (overrides, state)."""
    root.mkdir()
    for overrides, state in points:
        write_point(root, overrides, state)
    manifest = [{"name": point_name(o), "overrides": o, "argv": []} for o, _ in points]
    (root / MANIFEST).write_text(json.dumps({"points": manifest, "axes": axes, "stop_at": stop_at}))
    return root


def make_sweep(root: Path, grid=GRID, stop_at="eval/accuracy>=0.9") -> Path:
    """A grid sweep of kind x hidden_size x lr x seed, in that order."""
    points = [({"kind": kind, "hidden_size": hidden, "lr": lr, "seed": seed}, state)
              for (kind, hidden, lr), seeds in grid.items() for seed, state in enumerate(seeds)]
    return write_sweep(root, points, AXES, stop_at)


@pytest.fixture
def sweep(tmp_path) -> Path:
    return make_sweep(tmp_path / "sweep")


def table_rows(markdown: str, title: str) -> list:
    """The body rows of the markdown table under ``## title``, as lists of cells."""
    section = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def test_results_have_one_row_per_point_in_manifest_order(sweep):
    build_report(sweep)
    rows = list(csv.DictReader((sweep / "report" / "results.csv").open()))
    manifest = json.loads((sweep / MANIFEST).read_text())
    assert [r["name"] for r in rows] == [p["name"] for p in manifest["points"]]
    assert list(rows[0]) == ["name", "kind", "hidden_size", "lr", "seed", "status", "reason", "final eval/loss",
                             "final eval/accuracy", "best eval/loss", "best eval/accuracy", "reached_at_step",
                             "steps", "train_seconds", "tokens", "parameters", "state_size"]
    by_name = {r["name"]: r for r in rows}
    never = by_name["kind=lstm,hidden_size=32,lr=0.001,seed=1"]  # best 0.74 at step 20, final 0.72 at step 30
    assert never == {"name": never["name"], "kind": "lstm", "hidden_size": "32", "lr": "0.001", "seed": "1",
                     "status": "complete", "reason": "", "final eval/loss": "0.28", "final eval/accuracy": "0.72",
                     "best eval/loss": "0.26", "best eval/accuracy": "0.74", "reached_at_step": "", "steps": "30",
                     "train_seconds": "45.0", "tokens": "30000", "parameters": "3200",
                     "state_size": ""}
    stopped = by_name["kind=decoder,hidden_size=16,lr=0.01,seed=1"]  # --stop-at fired at step 50
    assert (stopped["reached_at_step"], stopped["steps"], stopped["best eval/accuracy"],
            stopped["final eval/accuracy"], stopped["parameters"]) == ("50", "50", "0.91", "0.91", "1607")


def test_points_not_complete_keep_their_rows_with_state_and_reason(sweep):
    build_report(sweep)
    data = json.loads((sweep / "report" / "results.json").read_text())
    states = {r["name"]: (r["status"], r["reason"], r["best eval/accuracy"], r["steps"]) for r in data["rows"]}
    assert len(data["rows"]) == 16 and data["threshold"] == "eval/accuracy>=0.9"
    assert states["kind=lstm,hidden_size=16,lr=0.01,seed=1"] == ("failed", FAILED_REASON, None, None)
    assert states["kind=decoder,hidden_size=32,lr=0.001,seed=0"] == (
        "interrupted", "saved at step 10 (preempted); a rerun resumes it", None, None)
    assert states["kind=decoder,hidden_size=32,lr=0.001,seed=1"] == ("pending", "not started", None, None)
    assert [r["status"] for r in data["rows"]].count("complete") == 13
    assert data["columns"][:5] == ["name", "kind", "hidden_size", "lr", "seed"]


def test_best_over_lr_per_model_and_width(sweep):
    report = build_report(sweep)
    markdown = (sweep / "report" / "report.md").read_text()
    assert "| kind | hidden_size | lr=0.001 | lr=0.01 | best lr | best eval/accuracy |" in markdown
    assert table_rows(markdown, "Best eval/accuracy over lr") == [
        ["lstm", "16", "0.6200", "0.8000 (1 of 2)", "0.01", "0.8000"],
        ["lstm", "32", "0.7200", "0.9400", "0.01", "0.9400"],
        ["decoder", "16", "0.5100", "0.9300", "0.01", "0.9300"],
        ["decoder", "32", "1 interrupted, 1 pending", "0.9800", "0.01", "0.9800"],
    ]
    assert report.markdown == markdown


def test_final_loss_picks_the_lowest(sweep):
    markdown = build_report(sweep, metric="eval/loss", use="final").markdown
    rows = table_rows(markdown, "Best eval/loss over lr")
    assert rows[0] == ["lstm", "16", "0.4000", "0.2200 (1 of 2)", "0.01", "0.2200"]  # finals 0.58 and 0.62 lost 0.4


def test_mean_and_spread_over_seeds(sweep):
    rows = table_rows(build_report(sweep).markdown, "Mean and spread of eval/accuracy over seeds")
    assert rows == [
        ["lstm", "16", "0.001", "0.6200", "0.0283", "2 of 2", ""],
        ["lstm", "16", "0.01", "0.8000", "", "1 of 2", "seed=1 failed"],
        ["lstm", "32", "0.001", "0.7200", "0.0283", "2 of 2", ""],
        ["lstm", "32", "0.01", "0.9400", "0.0283", "2 of 2", ""],
        ["decoder", "16", "0.001", "0.5100", "0.0141", "2 of 2", ""],
        ["decoder", "16", "0.01", "0.9300", "0.0283", "2 of 2", ""],
        ["decoder", "32", "0.001", "", "", "0 of 2", "seed=0 interrupted; seed=1 pending"],
        ["decoder", "32", "0.01", "0.9800", "0.0141", "2 of 2", ""],
    ]


def test_smallest_width_that_reaches_the_sweeps_threshold(sweep):
    rows = table_rows(build_report(sweep).markdown, "Smallest hidden_size that reaches eval/accuracy>=0.9")
    # lstm: at 16 no lr reaches 0.9 (and one point failed there); at 32 lr 0.01 does, at steps 40 and 20
    assert rows == [["lstm", "32", "0.01", "30", "hidden_size=16: 1 failed"],
                    ["decoder", "16", "0.01", "40", ""]]


def test_another_threshold_is_read_from_the_eval_history(sweep):
    report = build_report(sweep, threshold="eval/accuracy>=0.75")
    reached = {r.name: r.reached_at_step for r in report.results}
    assert reached["kind=lstm,hidden_size=16,lr=0.01,seed=0"] == 20  # 0.7, 0.8, 0.78
    assert reached["kind=lstm,hidden_size=32,lr=0.01,seed=0"] == 30  # 0.62, 0.72, 0.82, 0.92: not stopped_at's 40
    assert reached["kind=lstm,hidden_size=16,lr=0.001,seed=0"] is None
    rows = table_rows(report.markdown, "Smallest hidden_size that reaches eval/accuracy>=0.75")
    # lstm at 16: lr 0.01 has one complete seed, which reached it at 20 (its failed seed is listed)
    # decoder at 16, lr 0.01: 0.75 at step 10 (0.75, 0.85, 0.95) and 0.81 at step 40 (0.51 ... 0.91)
    assert rows == [["lstm", "16", "0.01", "20", "hidden_size=16: 1 failed"], ["decoder", "16", "0.01", "25", ""]]
    assert "Threshold: `eval/accuracy>=0.75` (asked for)" in report.markdown


def test_report_lists_the_points_not_complete_and_prints_the_tables(sweep, capsys):
    args = argparse.ArgumentParser()
    add_arguments(args)
    report_command(args.parse_args([str(sweep)]))
    printed = capsys.readouterr().out
    markdown = (sweep / "report" / "report.md").read_text()
    for text in (printed, markdown):
        assert "16 points in" in text and "13 complete, 1 failed, 1 interrupted, 1 pending" in text
        assert f"| kind=lstm,hidden_size=16,lr=0.01,seed=1 | failed | {FAILED_REASON} |" in text
        assert "| kind=decoder,hidden_size=32,lr=0.001,seed=1 | pending | not started |" in text
        assert "## Best eval/accuracy over lr" in text and "## Mean and spread" in text
    assert printed.rstrip().splitlines()[-1].startswith("distseq sweep report: wrote results.csv")


def test_plots_are_written_and_embedded(sweep):
    pytest.importorskip("matplotlib")
    report = build_report(sweep)
    assert report.plots == ["eval_accuracy_vs_lr.png"]
    assert (sweep / "report" / "eval_accuracy_vs_lr.png").read_bytes()[:8] == PNG
    assert "![eval_accuracy_vs_lr](eval_accuracy_vs_lr.png)" in report.markdown


def test_an_axis_left_over_gets_a_figure_per_value_and_old_figures_go(tmp_path):
    pytest.importorskip("matplotlib")
    axes = {**AXES, "num_layers": [1, 2], "seed": [0]}
    points = [({"kind": k, "hidden_size": h, "lr": lr, "num_layers": n, "seed": 0}, (0.5 + h / 100 + lr, None))
              for k in axes["kind"] for h in axes["hidden_size"] for lr in axes["lr"] for n in axes["num_layers"]]
    points[-1] = (points[-1][0], "failed")
    sweep = write_sweep(tmp_path / "s", points, axes, stop_at=None)
    first = build_report(sweep).plots
    assert first == ["eval_accuracy_vs_lr-num_layers=1.png", "eval_accuracy_vs_lr-num_layers=2.png"]
    report = build_report(sweep, by="hidden_size", lines="lr", panels="kind")
    assert report.plots == ["eval_accuracy_vs_hidden_size-num_layers=1.png",
                            "eval_accuracy_vs_hidden_size-num_layers=2.png"]
    assert sorted(p.name for p in (sweep / "report").glob("*.png")) == report.plots  # the first report's are gone
    assert "Not built: it needs a threshold" in report.markdown


def test_without_matplotlib_tables_and_one_line_on_plots(sweep, without_matplotlib):
    report = build_report(sweep)
    assert report.plots is None and not list((sweep / "report").glob("*.png"))
    assert PLOTS_HINT in report.markdown and PLOTS_HINT in report.text()
    assert "distseq sweep report" in PLOTS_HINT and "pip install" in PLOTS_HINT
    assert table_rows(report.markdown, "Best eval/accuracy over lr")[1][-1] == "0.9400"


def test_a_sweep_before_any_point_ran(tmp_path):
    grid = {key: ["pending", "pending"] for key in GRID}
    sweep = make_sweep(tmp_path / "s", grid)
    report = build_report(sweep)
    assert [r.status for r in report.results] == ["pending"] * 16
    rows = list(csv.DictReader((sweep / "report" / "results.csv").open()))
    assert len(rows) == 16 and {r["best eval/accuracy"] for r in rows} == {""}
    assert table_rows(report.markdown, "Best eval/accuracy over lr")[0] == [
        "lstm", "16", "2 pending", "2 pending", "none complete", ""]
    assert table_rows(report.markdown, "Smallest hidden_size that reaches eval/accuracy>=0.9")[0] == [
        "lstm", "not reached", "", "", "hidden_size=16: 4 pending; hidden_size=32: 4 pending"]


def test_a_listed_sweep_without_axes(tmp_path):
    """Points listed one by one: the axes come from their overrides; one that leaves lr alone shows 'base'."""
    sweep = tmp_path / "listed"
    sweep.mkdir()
    points = [{"name": "a", "overrides": {"lr": 0.01}}, {"name": "b", "overrides": {"lr": 0.001}},
              {"name": "c", "overrides": {}}]
    (sweep / MANIFEST).write_text(json.dumps({"points": [{**p, "argv": []} for p in points], "stop_at": None}))
    for name, best in (("a", 0.8), ("c", 0.7)):
        (sweep / name).mkdir()
        (sweep / name / "summary.json").write_text(json.dumps(summary({"hidden_size": 8, "kind": "gru"}, best,
                                                                      None)))
    report = build_report(sweep)
    assert table_rows(report.markdown, "Best eval/accuracy over lr") == [
        ["0.8000", "1 pending", "0.7000", "0.01", "0.8000"]]
    assert "| lr=0.01 | lr=0.001 | lr=base | best lr |" in report.markdown
    assert "Not built: it needs a threshold (the sweep has no --stop-at)" in report.markdown
    assert "and an axis to minimise (the sweep has no hidden_size axis): pass --smallest AXIS." in report.markdown


def test_bad_requests_are_one_line_errors(sweep, tmp_path):
    with pytest.raises(ConfigError, match=r"^SWEEP_DIR: .* has no sweep.json"):
        build_report(tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"^--by: 'width' is not an axis of this sweep \(choose from kind, "
                                          r"hidden_size, lr, seed\)"):
        build_report(sweep, by="width")
    with pytest.raises(ConfigError, match=r"^--threshold: expected METRIC>=VALUE"):
        build_report(sweep, threshold="accuracy > 0.9")
    with pytest.raises(ConfigError, match=r"^--metric: expected an evaluation metric"):
        build_report(sweep, metric="train/loss")
    with pytest.raises(ConfigError, match=r"^--by: .*different axes"):
        build_report(sweep, by="lr", lines="lr")
    assert not (sweep / "report").exists()
