"""``distseq sweep``: a grid of runs that is checked whole, resumes after any stop, leaves finished points
alone, records failures without stopping the others, and refuses what would mix two experiments."""

import fcntl
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import DISTSEQ, Started, assert_bit_identical, run_distseq, run_here, summary, weights_at

from distseq.fsio import RunDirLock
from distseq.sweep.layout import FAILURE, LOCK, point_status, read_manifest
from distseq.sweep.runner import write_manifest
from distseq.sweep.spec import load_spec

TINY = {"seq-len": 6, "hidden-size": 8, "global-batch-size": 16, "max-steps": 8, "eval-every": 4, "eval-size": 64,
        "log-with": "none", "precision": "no", "log-every": 4}
# a token task, 2 models x 2 widths x 2 learning rates, 2 at a time; each point long enough to be stopped part-way,
# and points enough that each of the three sweeps of the test below has some left to run
TOKENS = {"base": {"preset": "induction", "options": {
    "seq-len": 8, "vocab-size": 6, "num-layers": 1, "global-batch-size": 16, "max-steps": 24, "eval-every": 8,
    "eval-size": 64, "checkpoint-every": 4, "log-every": 4, "log-with": "tensorboard", "precision": "no"}},
    "grid": {"model": ["decoder", "lstm"], "hidden-size": [8, 16], "lr": [0.01, 0.003]}, "pool": 2}


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tree_digest(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"hidden-sise": [8]}}, "grid.hidden-sise: unknown option 'hidden-sise' (did you mean 'hidden_size'?)"),
    ({"grid": {"lr": []}}, "grid.lr is empty: give it at least one value"),
    ({"grid": {"hidden-size": [8, "wide"]}}, "grid.hidden-size: --hidden-size: must be an integer (got 'wide')"),
    ({"grid": {"lr": [0.1]}, "points": [{"lr": 0.1}]}, "the point lr=0.1 is listed twice (points 0 and 1, counting "
                                                       "the grid's combinations first)"),
    ({"grid": {"lr": [0.1]}, "retries": 2}, "unknown key 'retries' (allowed: base, grid, points, backend, processes, "
                                            "threads, pool, slurm)"),
    ({"points": [{"run-dir": "x"}]}, "points[0]: 'run-dir' is the sweep's to set for each point"),
    ({"base": {"options": {"lr": 0.1}}}, "no points: give a grid, a list of points, or both"),
    ({"grid": {"lr": [0.1]}, "backend": "ray"}, "backend must be one of local, slurm (got 'ray')"),
])
def test_a_bad_sweep_file_is_one_line_and_creates_nothing(spec, message, tmp_path):
    path = write_spec(tmp_path / "bad.yaml", spec)
    proc = run_here(["sweep", path, "--dir", tmp_path / "sweep"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"distseq sweep: error: sweep file: {path}: {message}"], proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_dry_run_lists_each_point_and_its_command(tmp_path):
    path = write_spec(tmp_path / "s.yaml", {"base": {"options": TINY}, "grid": {"model": ["rnn", "gru"]},
                                            "points": [{"model": "lstm", "bidirectional": True}]})
    proc = run_here(["sweep", path, "--dir", tmp_path / "sweep", "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"sweep: 3 point(s) in {tmp_path / 'sweep'}, local, 1 process(es) x 1 thread(s) each"
    assert [line.split()[:2] for line in lines[1::2]] == [["pending", "model=rnn"], ["pending", "model=gru"],
                                                          ["pending", "model=lstm,bidirectional=true"]]
    assert lines[6].strip().endswith(f"--model lstm --bidirectional --run-dir {tmp_path / 'sweep'}/model=lstm,"
                                     f"bidirectional=true")
    assert not (tmp_path / "sweep").exists()


def test_a_changed_spec_is_refused_unless_it_only_adds_points(tmp_path):
    root = tmp_path / "sweep"
    first = write_spec(tmp_path / "s.yaml", {"base": {"options": TINY}, "grid": {"lr": [0.1, 0.01]}})
    root.mkdir()
    write_manifest(root, load_spec(first))
    grown = write_spec(tmp_path / "s.yaml", {"base": {"options": TINY}, "grid": {"lr": [0.1, 0.01, 0.001]}})
    assert run_here(["sweep", grown, "--dir", root, "--dry-run"]).returncode == 0
    changed = write_spec(tmp_path / "s.yaml", {"base": {"options": {**TINY, "max-steps": 9}}, "grid": {"lr": [0.1]}})
    proc = run_here(["sweep", changed, "--dir", root, "--dry-run"])
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"distseq sweep: error: sweep file: {changed} drops or changes lr=0.1, lr=0.01 of the sweep in {root}; a spec "
        f"may only add points to a sweep (use another sweep dir)")
    threads = write_spec(tmp_path / "s.yaml", {"base": {"options": TINY}, "grid": {"lr": [0.1, 0.01]}, "threads": 2})
    proc = run_here(["sweep", threads, "--dir", root, "--dry-run"])
    assert proc.returncode == 2 and "runs each point on 1 process(es) x 2 thread(s)" in proc.stderr


def test_a_second_sweep_on_one_dir_is_refused(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    path = write_spec(tmp_path / "s.yaml", {"base": {"options": TINY}, "grid": {"lr": [0.1]}})
    held = RunDirLock(root, name=LOCK, what="sweep", option="SWEEP_DIR").acquire()
    try:
        proc = run_here(["sweep", path, "--dir", root])
    finally:
        held.release()
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        f"distseq sweep: error: SWEEP_DIR: {root} is in use by another distseq sweep (host ")
    assert read_manifest(root) is None


@pytest.mark.slow
def test_a_failing_point_never_stops_the_others_and_retry_failed_reruns_only_it(tmp_path):
    """A point whose options train refuses (exit 2, found before it starts) and one that crashes mid-run (its
    task raises at the second block: exit 1) are recorded with their one line; the others complete."""
    plugin = tmp_path / "crashes.py"
    plugin.write_text("import torch, distseq\n\n@distseq.register_task('crashes')\nclass Crashes:\n"
                      "    head = 'binary'\n    made = 0\n    def num_features(self, spec): return 1\n"
                      "    def num_outputs(self, spec): return 1\n    def make(self, generator, n, spec):\n"
                      "        self.made += 1\n        if self.made > 2:  # past the pre-flight check\n"
                      "            raise RuntimeError('my bug')\n"
                      "        x = torch.randn(n, spec.seq_len, 1, generator=generator)\n"
                      "        return {'x': x, 'y': (x.sum((1, 2)) > 0).float()}\n")
    path = write_spec(tmp_path / "s.yaml", {"base": {"options": {**TINY, "block-size": 16}, "import": [str(plugin)]},
                                            "points": [{"model": "rnn"}, {"task": "copy", "copy-len": 3},
                                                       {"task": "crashes"}, {"model": "gru"}]})
    root = tmp_path / "sweep"
    proc = run_distseq(["sweep", str(path), "--dir", str(root)], timeout=300)
    assert proc.returncode == 1, proc.stderr
    bad, crash = "task=copy,copy-len=3", "task=crashes"
    reason = "distseq train: error: --seq-len: the copy task needs --seq-len >= 2 x --copy-len + 1 = 7"
    assert f"sweep: failed   {bad}: {reason}" in proc.stdout
    crashed = json.loads((root / crash / FAILURE).read_text())
    assert crashed["exit_code"] == 1 and crashed["reason"].startswith("distseq train: error: task 'crashes': make(")
    assert "raised RuntimeError: my bug" in crashed["reason"]
    assert proc.stderr.splitlines()[:3] == ["sweep: failed points (--retry-failed reruns them):",
                                            f"  {bad}  {reason}", f"  {crash:<{len(bad)}}  {crashed['reason']}"]
    assert [point_status(root / n)[0] for n in ("model=rnn", bad, crash, "model=gru")] == [
        "complete", "failed", "failed", "complete"]
    assert json.loads((root / bad / FAILURE).read_text()) == {"exit_code": 2, "reason": reason}
    done = tree_digest(root / "model=rnn")
    again = run_distseq(["sweep", str(path), "--dir", str(root)], timeout=300)  # failed ones stay failed
    assert again.returncode == 1 and "sweep: started" not in again.stdout
    retried = run_distseq(["sweep", str(path), "--dir", str(root), "--retry-failed"], timeout=300)
    assert retried.returncode == 1 and "sweep: 2 of 4 point(s) to run" in retried.stdout
    assert f"sweep: started  {crash}" in retried.stdout and f"sweep: failed   {bad}" in retried.stdout
    assert "started  model=" not in retried.stdout and tree_digest(root / "model=rnn") == done


@pytest.mark.slow
def test_a_sweep_stopped_any_way_resumes_bit_exact_and_leaves_finished_points_alone(tmp_path):
    """SIGTERM to the sweep (every running point saves), then kill -9 of the sweep (its points get SIGTERM from
    the kernel and save) and kill -9 of one point: each rerun finishes what was left, the complete points'
    files untouched, and an interrupted point ends bit-exact with a standalone run of its options."""
    path, root = write_spec(tmp_path / "s.yaml", TOKENS), tmp_path / "sweep"
    cmd = [*DISTSEQ, "sweep", str(path), "--dir", str(root)]

    with Started(cmd, tmp_path / "logs") as sweep:  # SIGTERM once two points are complete and more have saved
        sweep.wait_for_line("sweep: 2/8 complete", 240)
        wait_for(lambda: saved_and_running(root), 120)
        sweep.popen.send_signal(signal.SIGTERM)
        assert sweep.finish(120).returncode == 143
    names = [p["name"] for p in read_manifest(root)["points"]]
    states = {name: point_status(root / name)[0] for name in names}
    complete = [name for name, state in states.items() if state == "complete"]
    stopped = [name for name, state in states.items() if state == "interrupted"]
    saved = [name for name in stopped if list((root / name / "checkpoints").glob("step-*"))]
    assert len(complete) >= 2 and saved, states
    assert all(summary(root / name)["status"] == "preempted" for name in saved)  # saved on the way out
    untouched = {name: tree_digest(root / name) for name in complete}

    with Started(cmd, tmp_path / "logs") as sweep:  # kill -9 of one point, then of the sweep itself
        wait_for(lambda: saved_and_running(root), 120)
        point = saved_and_running(root)[0]
        os.kill(holder_pid(point), signal.SIGKILL)
        sweep.wait_for_line(f"sweep: stopped  {point.name}", 60)
        wait_for(lambda: saved_and_running(root), 120)
        sweep.popen.kill()
        sweep.finish(60)
    wait_for(lambda: not running(root), 120)  # the orphaned points got SIGTERM, saved and let go of their dirs

    proc = run_distseq(["sweep", str(path), "--dir", str(root)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(point_status(root / name)[0] == "complete" for name in names)
    assert {name: tree_digest(root / name) for name in complete} == untouched
    again = run_distseq(["sweep", str(path), "--dir", str(root)], timeout=120)
    assert again.returncode == 0 and "sweep: 0 of 8 point(s) to run" in again.stdout

    resumed = saved[0]  # the same options alone, never stopped
    argv = next(p["argv"] for p in read_manifest(root)["points"] if p["name"] == resumed)
    alone = tmp_path / "alone"
    assert run_distseq(["train", *argv, "--run-dir", str(alone), "--no-progress"]).returncode == 0
    assert_bit_identical(weights_at(root / resumed, 24), weights_at(alone, 24))
    assert (summary(root / resumed)["eval/accuracy"], summary(root / resumed)["step"]) == \
        (summary(alone)["eval/accuracy"], 24)
    assert list((root / resumed / "tensorboard").glob("events.out.tfevents*"))  # SWEEP is a TensorBoard logdir
    # the report's row of the resumed point is the standalone run's, figure for figure
    row = next(r for r in json.loads((root / "report" / "results.json").read_text())["rows"] if r["name"] == resumed)
    history = summary(alone)["eval_history"]
    assert row["status"] == "complete" and row["steps"] == 24 and row["parameters"] == summary(alone)["parameters"]
    assert row["final eval/accuracy"] == summary(alone)["eval/accuracy"]
    assert row["best eval/loss"] == min(e["eval/loss"] for e in history)
    assert row["tokens"] == summary(alone)["tokens"]


def running(root: Path) -> list:
    """The points whose run dir a process holds now (the OS lock is taken; a process that exited at once on
    a signal during start-up leaves its name in the file but not the lock)."""
    return [p for p in sorted(root.iterdir()) if (p / ".lock").is_file() and held(p / ".lock")]


def held(lock: Path) -> bool:
    with open(lock) as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


def saved_and_running(root: Path) -> list:
    return [p for p in running(root) if list((p / "checkpoints").glob("step-*"))]


def holder_pid(run_dir: Path) -> int:
    return int((run_dir / ".lock").read_text().split("pid ")[1].split(",")[0])


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
