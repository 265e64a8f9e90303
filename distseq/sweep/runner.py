"""``distseq sweep SPEC``: every point of a sweep file run to its end, once, whatever happens meanwhile.

The sweep dir (``SWEEP/``) holds the manifest and one run dir per point. A run of the command:

1. checks the whole spec (a bad file is one line, exit 2, nothing created) and takes the sweep's lock (a
   second sweep on the same dir is refused in one line);
2. compares the spec with the manifest: the same points, or more of them, go on; a spec that changes or
   drops a point is refused (another sweep dir is another experiment);
3. leaves complete points untouched (not even started), resumes interrupted ones from their checkpoints,
   starts pending ones, and reruns failed ones only with ``--retry-failed``; a point whose options
   ``distseq train`` would refuse fails at once with that one line;
4. runs them on its backend, saying when each starts and ends, with the overall progress and the time
   left; a stop signal is passed on to every running point (each saves) and no new one starts;
5. ends with the report (``SWEEP/report/``), a table of what failed and why, and an exit code: 0 when
   every point is complete, 1 when any failed or was interrupted, 130/143 when stopped by a signal.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from distseq.errors import EXIT_FAILURE, ConfigError
from distseq.fsio import RunDirLock, write_json
from distseq.ops.signals import catchable, exit_code
from distseq.sweep.layout import FAILURE, FORMAT_VERSION, LOCK, MANIFEST, Point, point_status, read_manifest
from distseq.sweep.local import LocalPool, pool_size
from distseq.sweep.report import build_report
from distseq.sweep.spec import Spec, check_points, load_spec

LOGS = "logs"  # SWEEP/logs/<point>.log: each point's output


@dataclass
class Tally:
    """The sweep's progress, for its lines and its end."""

    total: int
    done: int = 0  # complete before this run or now
    failed: Dict[str, str] = field(default_factory=dict)  # name -> one-line reason
    interrupted: List[str] = field(default_factory=list)
    running: int = 0
    seconds: List[float] = field(default_factory=list)  # of the points that ended in this run

    def line(self, pool: int) -> str:
        ended = self.done + len(self.failed) + len(self.interrupted)
        left = self.total - ended
        eta = ""
        if self.seconds and left:
            eta = f"; about {_duration(sum(self.seconds) / len(self.seconds) * left / max(pool, 1))} left"
        return (f"{self.done}/{self.total} complete, {self.running} running, {len(self.failed)} failed"
                + (f", {len(self.interrupted)} interrupted" if self.interrupted else "") + eta)


def sweep_dir_of(spec: Spec, given: Optional[str]) -> Path:
    return Path(given) if given else Path("runs") / "sweeps" / spec.path.stem


def run_sweep(spec_path: str, sweep_dir: Optional[str] = None, dry_run: bool = False, retry_failed: bool = False,
              pool: Optional[int] = None) -> int:
    spec = load_spec(spec_path)
    root = sweep_dir_of(spec, sweep_dir)
    manifest = read_manifest(root)
    check_growth(manifest, spec, root)
    if dry_run:
        print_plan(spec, root)
        return 0
    root.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(root, name=LOCK, what="sweep", option="SWEEP_DIR").acquire()
    try:
        write_manifest(root, spec)
        tally = Tally(total=len(spec.points))
        todo = to_run(spec, root, retry_failed, tally)
        size = pool or spec.pool or pool_size(spec.processes, spec.threads)
        print(f"sweep: {len(todo)} of {tally.total} point(s) to run in {root}"
              + (f", {size} at a time" if spec.backend == "local" else " as a SLURM job array")
              + f" ({tally.line(size)})", flush=True)
        refused = fail_refused(spec, root, todo, tally)
        if spec.backend == "slurm":
            from distseq.sweep.slurm import submit

            return submit(spec, root, todo, refused)
        return run_local(spec, root, [p for p in todo if p.name not in refused], tally, size)
    finally:
        lock.release()


def check_growth(manifest: Optional[dict], spec: Spec, root: Path) -> None:
    """The sweep dir's points are all still in the spec, unchanged (the spec may add points)."""
    if manifest is None:
        return
    then, now = manifest["identity"], spec.identity()
    if (then["processes"], then["threads"]) != (now["processes"], now["threads"]):
        raise ConfigError("sweep file", f"{spec.path} runs each point on {now['processes']} process(es) x "
                                        f"{now['threads']} thread(s); {root} ran them on {then['processes']} x "
                                        f"{then['threads']}: results would not be comparable (use another sweep dir)")
    changed = [p["name"] for p in manifest["points"] if now["points"].get(p["name"]) != p["argv"]]
    if changed:
        what = "drops or changes" if len(changed) > 1 else "drops or changes the point"
        raise ConfigError("sweep file", f"{spec.path} {what} {', '.join(changed[:3])}"
                                        f"{' and more' if len(changed) > 3 else ''} of the sweep in {root}; a spec "
                                        f"may only add points to a sweep (use another sweep dir)")


def write_manifest(root: Path, spec: Spec) -> None:
    write_json(root / MANIFEST, {
        "format_version": FORMAT_VERSION, "spec": str(spec.path.resolve()), "spec_sha256": spec.sha256(),
        "identity": spec.identity(), "axes": spec.axes, "stop_at": spec.base.get("stop_at"),
        "points": [{"name": p.name, "overrides": p.overrides, "argv": list(p.argv)} for p in spec.points]})


def print_plan(spec: Spec, root: Path) -> None:
    print(f"sweep: {len(spec.points)} point(s) in {root}, {spec.backend}, {spec.processes} process(es) x "
          f"{spec.threads} thread(s) each")
    for point in spec.points:
        status, _ = point_status(root / point.name)
        print(f"{status:<12} {point.name}\n             distseq train {' '.join(point.argv)} --run-dir "
              f"{root / point.name}")


def fail_refused(spec: Spec, root: Path, todo: List[Point], tally: Tally) -> Dict[str, str]:
    """The points to run whose options ``distseq train`` refuses fail now, with its line."""
    refused = {name: reason for name, reason in check_points(spec).items() if name in {p.name for p in todo}}
    for name, reason in refused.items():
        record_failure(root / name, 2, reason)
        tally.failed[name] = reason
        print(f"sweep: failed   {name}: {reason}", flush=True)
    return refused


def run_local(spec: Spec, root: Path, todo: List[Point], tally: Tally, size: int) -> int:
    from tqdm.auto import tqdm

    local = LocalPool(size, spec.processes, spec.threads, root, root / LOGS)
    # on a terminal an overall bar (the counts and the time left beside it); in a log file, a line each time
    bar = tqdm(total=tally.total, initial=tally.done + len(tally.failed), desc="sweep", unit="point",
               disable=not sys.stderr.isatty(), bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {postfix}")
    say = tqdm.write if not bar.disable else (lambda line: print(line, flush=True))

    def started(point: Point) -> None:
        tally.running += 1
        say(f"sweep: started  {point.name}")
        bar.set_postfix_str(tally.line(size))

    def ended(point: Point, code: int, log: Path, seconds: float) -> None:
        tally.running -= 1
        tally.seconds.append(seconds)
        say(f"sweep: {settle(root / point.name, code, log, tally, point.name)} ({_duration(seconds)})")
        if bar.disable:
            say(f"sweep: {tally.line(size)}")
        bar.update(1)
        bar.set_postfix_str(tally.line(size))

    with passed_on(local.stop):
        local.run(todo, started, ended)
    bar.close()
    build_report(root)  # the default report, from the files alone
    return finish(tally, local.stopping, root)


def to_run(spec: Spec, root: Path, retry_failed: bool, tally: Tally) -> List[Point]:
    """The points this run starts; complete ones are counted and left alone."""
    todo = []
    for point in spec.points:
        status, reason = point_status(root / point.name)
        if status == "complete":
            tally.done += 1
        elif status == "failed" and not retry_failed:
            tally.failed[point.name] = reason or "failed"
        else:
            (root / point.name / FAILURE).unlink(missing_ok=True)
            todo.append(point)
    return todo


def settle(run_dir: Path, code: int, log: Path, tally: Tally, name: str) -> str:
    """How a point ended, counted; the line that says so."""
    status, reason = classify(run_dir, code, last_line(log))
    if status == "complete":
        tally.done += 1
        return f"complete {name}: {result_text(run_dir)}"
    if status == "interrupted":
        tally.interrupted.append(name)
        return f"stopped  {name} (exit {code}); a rerun resumes it"
    tally.failed[name] = reason
    return f"failed   {name} (exit {code}): {reason}"


def classify(run_dir: Path, code: int, last: str) -> Tuple[str, Optional[str]]:
    """How a point's process ended, recorded where its status is read from: complete, interrupted (a signal or
    a kill: its checkpoints are intact and a rerun resumes it) or failed (its one line, kept in the run dir)."""
    status, _ = point_status(run_dir)
    if code == 0 and status == "complete":
        return "complete", None
    if code < 0 or code in (130, 137, 143) or code == 0:
        return "interrupted", None
    reason = last or f"exit {code}"
    record_failure(run_dir, code, reason)
    return "failed", reason


def record_failure(run_dir: Path, code: int, reason: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / FAILURE, {"exit_code": code, "reason": reason})


def last_line(log: Path) -> str:
    """The point's own last line: distseq ends every failure with one."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""


def result_text(run_dir: Path) -> str:
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = " ".join(f"{k}={v:.4f}" for k, v in summary.items() if k in ("eval/accuracy", "eval/loss"))
    stopped = summary.get("stopped_at")
    return f"step {summary['step']} {metrics}" + (f" (--stop-at held at step {stopped['step']})" if stopped else "")


def finish(tally: Tally, stopping: Optional[int], root: Path) -> int:
    if tally.failed:
        width = max(map(len, tally.failed))
        print("sweep: failed points (--retry-failed reruns them):", file=sys.stderr)
        for name, reason in tally.failed.items():
            print(f"  {name:<{width}}  {reason}", file=sys.stderr)
    print(f"sweep: report in {root / 'report'}", flush=True)
    if stopping is not None:
        print(f"sweep: {signal.Signals(stopping).name}: every running point saved; run the sweep again to go on",
              file=sys.stderr, flush=True)
        return exit_code(stopping)
    if tally.failed or tally.interrupted:
        print(f"sweep: {len(tally.failed)} failed, {len(tally.interrupted)} interrupted of {tally.total}",
              file=sys.stderr, flush=True)
        return EXIT_FAILURE
    return 0


class passed_on:
    """While running points: the stop signals (those not inherited as ignored) go to ``stop``."""

    def __init__(self, stop):
        self.stop, self.previous = stop, {}

    def __enter__(self):
        for sig in catchable():
            self.previous[sig] = signal.signal(sig, lambda signum, frame: self.stop(signum))
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
