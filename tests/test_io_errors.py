"""I/O errors: a disk that fills up, turns read-only or refuses permission during training ends the run
with one line naming the file and the checkpoint that was kept, and the next run recovers; output paths
that cannot be written are refused before anything runs.

The errors are real: a small tmpfs (``mount -t tmpfs``, which needs root, as in this sandbox and CI),
filled up or remounted read-only, and a training process without CAP_DAC_OVERRIDE (``setpriv``) for
permissions, which root would otherwise bypass.
"""

import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import DISTSEQ, REPO, cpu_env, run_until, summary

from distseq.checkpoint.format import read_meta
from distseq.cli import main

pytestmark = pytest.mark.slow  # real training runs: left out of the fast tier (-m 'not slow')

TRAIN = ["train", "--hidden-size", "16", "--checkpoint-every", "5", "--max-steps", "40", "--log-every", "5",
         "--no-progress", "--eval-every", "0", "--eval-size", "64", "--global-batch-size", "64", "--precision", "no"]
# root bypasses file permissions through these two capabilities: drop them for the training process
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search", "--"]


@pytest.fixture
def tmpfs():
    """``tmpfs(path, *options)`` mounts a 16 MB tmpfs at ``path`` (created); unmounted after the test."""
    mounted = []

    def mount(path: Path, *options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = ",".join(("size=16m", *options))
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            message = done.stderr.strip()
            if os.geteuid() != 0 or any(s in message.lower() for s in ("permission denied", "not permitted",
                                                                         "superuser", "must be root")):
                pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {message}")
            pytest.fail(f"mount -t tmpfs at {path} failed: {message}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run_and_break(args, breaker, wrap=(), at="step=10/"):
    """Start training, call ``breaker()`` once stdout shows a line starting with ``at``; (exit, out, err)."""
    logs = Path(tempfile.mkdtemp(prefix="distseq-io-"))
    done = run_until([*wrap, *DISTSEQ, *args], at, lambda process: breaker(), logs, timeout=120)
    shutil.rmtree(logs, ignore_errors=True)
    return done.returncode, done.stdout, done.stderr


def rerun(args, wrap=()):
    done = subprocess.run([*wrap, sys.executable, "-m", "distseq.cli", *args], capture_output=True, text=True,
                          env=cpu_env(), cwd=REPO, timeout=180)
    return done.returncode, done.stdout, done.stderr


def step_dirs(run_dir: Path):
    return sorted((run_dir / "checkpoints").glob("step-*"))


def assert_one_line_naming_the_kept_checkpoint(code, out, err, run_dir, reason) -> Path:
    """Exit 1 and stderr is exactly one line, ``distseq train: error: cannot write FILE: REASON; kept CKPT``,
    FILE a path in the run directory and CKPT the newest complete checkpoint, intact."""
    shown = f"exit {code}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
    assert code == 1, shown
    lines = err.strip().splitlines()
    assert len(lines) == 1, shown
    line = lines[0]
    match = re.fullmatch(r"distseq train: error: cannot write (.+?): (.+); kept (.+)", line)
    assert match, line
    assert match.group(1).startswith(f"{run_dir}/"), f"the line does not name the file it could not write: {line}"
    assert match.group(2) == reason, line
    kept = step_dirs(run_dir)
    assert kept, f"no complete checkpoint left; {shown}"
    newest = kept[-1]
    assert int(newest.name[5:]) >= 5, newest  # `step=10/` is logged just before step 10 is saved
    assert match.group(3) == str(newest), line
    read_meta(newest)  # complete and intact: every file matches its sha256
    return newest


def assert_recovers(args, run_dir, kept, wrap=()):
    code, out, err = rerun(args, wrap)
    assert code == 0, f"exit {code}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    assert f"distseq: resuming from {kept} " in out, out
    result = summary(run_dir)
    assert result["status"] == "complete" and result["step"] == 40
    assert read_meta(run_dir / "checkpoints" / "step-00000040")[0]["step"] == 40
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def fill_up(directory: Path) -> Path:
    """Write one file until the file system says ENOSPC; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)
    return filler


def test_disk_full_is_one_line_and_the_next_run_resumes(tmpfs, tmp_path):
    run_dir = tmpfs(tmp_path / "mnt") / "run"
    args = [*TRAIN, "--run-dir", str(run_dir)]
    filler = []
    code, out, err = run_and_break(args, lambda: filler.append(fill_up(run_dir.parent)))
    kept = assert_one_line_naming_the_kept_checkpoint(code, out, err, run_dir, "No space left on device")

    filler[0].unlink()
    assert_recovers(args, run_dir, kept)


def remount(path: Path, mode: str) -> None:
    """``mount -o remount,MODE``; a checkpoint write in progress holds a file open (busy): try again."""
    for _ in range(200):
        done = subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True)
        if done.returncode == 0:
            return
        time.sleep(0.01)
    pytest.fail(f"mount -o remount,{mode} {path}: {done.stderr.strip()}")


def test_read_only_file_system_is_one_line_and_the_next_run_resumes(tmpfs, tmp_path):
    """The tmpfs is mounted at RUN/checkpoints: Linux refuses ``remount,ro`` while any file of the mount
    is open for writing ("mount point is busy"), and the TensorBoard event file in RUN/tensorboard
    stays open for the whole run."""
    run_dir = tmp_path / "run"
    checkpoints = tmpfs(run_dir / "checkpoints")
    args = [*TRAIN, "--run-dir", str(run_dir)]
    code, out, err = run_and_break(args, lambda: remount(checkpoints, "ro"))
    kept = assert_one_line_naming_the_kept_checkpoint(code, out, err, run_dir, "Read-only file system")

    remount(checkpoints, "rw")
    assert_recovers(args, run_dir, kept)


def no_dac_wrap(scratch: Path) -> list:
    """How to start a process that file permissions apply to; checked on a 0o500 directory."""
    wrap = NO_DAC if os.geteuid() == 0 else []
    if wrap and shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run a process as root without CAP_DAC_OVERRIDE")
    locked = scratch / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    probe = subprocess.run([*wrap, sys.executable, "-c", f"open({str(locked / 'x')!r}, 'w')"], capture_output=True,
                           text=True, timeout=60)
    locked.chmod(0o755)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, \
        f"a write into a 0o500 directory did not fail for {wrap or 'this user'}: exit {probe.returncode} {probe.stderr}"
    return wrap


def test_permission_denied_is_one_line_and_the_next_run_resumes(tmp_path):
    wrap = no_dac_wrap(tmp_path)
    run_dir = tmp_path / "run"
    args = [*TRAIN, "--run-dir", str(run_dir)]
    checkpoints = run_dir / "checkpoints"
    try:
        code, out, err = run_and_break(args, lambda: checkpoints.chmod(0o500), wrap)
        kept = assert_one_line_naming_the_kept_checkpoint(code, out, err, run_dir, "Permission denied")
    finally:
        checkpoints.chmod(0o755)
    assert_recovers(args, run_dir, kept, wrap)


# --- output paths checked before anything runs ---------------------------------------------------
def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def plain_file(tmp: Path) -> Path:
    path = tmp / "plain"
    path.write_text("data")
    return path


def a_directory(tmp: Path) -> Path:
    path = tmp / "adir"
    path.mkdir()
    return path


# (case, argv builder (tmp, read-only mount) -> argv, text of the one line)
UPFRONT = [
    ("train run dir on a read-only mount", lambda t, ro: ["train", "--run-dir", f"{ro}/run", "--max-steps", "1"],
     "distseq train: error: --run-dir: cannot write to {ro}/run: Read-only file system"),
    ("train run dir under a regular file",
     lambda t, ro: ["train", "--run-dir", f"{plain_file(t)}/run", "--max-steps", "1"],
     "distseq train: error: --run-dir: cannot create {t}/plain/run: {t}/plain is not a directory"),
    ("eval output in a missing directory",
     lambda t, ro: ["eval", "--run-dir", f"{t}/run", "--output", f"{t}/missing/eval.json"],
     "distseq eval: error: --output: cannot write {t}/missing/eval.json: directory {t}/missing does not exist"),
    ("export out is a file", lambda t, ro: ["export", "--checkpoint", f"{t}/ckpt", "--out", str(plain_file(t))],
     "distseq export: error: --out: {t}/plain exists and is not a directory"),
    ("predict output is a directory",
     lambda t, ro: ["predict", "--checkpoint", f"{t}/ckpt", "--random", "2", "--output", str(a_directory(t))],
     "distseq predict: error: --output: {t}/adir is a directory; give a file name"),
    ("probe json on a read-only mount", lambda t, ro: ["probe", "--json", f"{ro}/probe.json"],
     "distseq probe: error: --json: cannot write to {ro}/probe.json: Read-only file system"),
    ("bench out is a file", lambda t, ro: ["bench", "--out", str(plain_file(t))],
     "distseq bench: error: --out: {t}/plain exists and is not a directory"),
]


@pytest.mark.parametrize("case,argv,message", UPFRONT, ids=[c[0] for c in UPFRONT])
def test_unwritable_output_is_refused_before_anything_runs(case, argv, message, tmpfs, tmp_path, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    read_only = tmpfs(tmp_path / "ro", "ro") if "read-only" in case else tmp_path / "ro-unused"
    args = argv(scratch, read_only)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.strip().splitlines() == [message.format(t=scratch, ro=read_only)]
    assert snapshot(tmp_path) == before  # nothing created, nothing changed


def test_atomic_writes_follow_symlinks_and_never_replace_special_files(tmp_path):
    """predict --output to a symlink replaces the target, not the link; to a FIFO (or /dev/null) it
    writes into it instead of renaming a regular file over it."""
    import threading

    from distseq.fsio import write_text_atomically

    target = tmp_path / "target.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    write_text_atomically(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo).read()))
    reader.start()
    write_text_atomically(fifo, "through the pipe\n")
    reader.join(timeout=10)
    assert received == ["through the pipe\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "pipe", "target.jsonl"]  # no temp left
