"""One run per run dir (an OS lock); readers never take it and never fail because --keep-last deleted under them."""

import json
import os
import signal
import socket

import pytest
import torch
from conftest import DISTSEQ, Started, assert_ok, run_here, summary

from distseq.checkpoint.format import list_checkpoints, newest_verified, read_meta
from distseq.errors import CheckpointError, ConfigError
from distseq.fsio import RunDirLock
from distseq.inference.export import model_from_checkpoint

pytestmark = pytest.mark.slow  # real training runs: left out of the fast tier (-m 'not slow')

LONG = ["train", "--hidden-size", "8", "--global-batch-size", "16", "--max-steps", "100000", "--log-every", "5",
        "--eval-every", "0", "--eval-size", "64", "--checkpoint-every", "1", "--keep-last", "1", "--no-progress",
        "--precision", "no"]


def test_a_second_writer_is_refused_naming_the_holder_and_readers_still_work(tmp_path):
    run = tmp_path / "run"
    with Started([*DISTSEQ, *LONG, "--run-dir", str(run)], tmp_path / "logs") as writer:
        writer.wait_for_line("step=10/")
        second = run_here([*LONG, "--max-steps", "20", "--run-dir", str(run)])
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"distseq train: error: --run-dir: {run} is in use by another distseq run (host {socket.gethostname()}, "
            f"pid {writer.pid}, since " + second.stderr.split("since ")[1].split(")")[0]
            + "); wait for it to end or choose another --run-dir"]
        # readers, while the writer saves a checkpoint every step and keeps only the newest
        for attempt in range(3):
            evaluated = run_here(["eval", "--run-dir", str(run), "--output", str(tmp_path / f"eval{attempt}.json"),
                                  "--eval-size", "64"])
            assert_ok(evaluated)
            assert json.loads((tmp_path / f"eval{attempt}.json").read_text())["samples"] == 64
        exported = run_here(["export", "--checkpoint", str(newest_verified(run, print)[0]),
                             "--out", str(tmp_path / "exported")])
        # the checkpoint may be gone by the time export starts: then one line says so; never a traceback
        if exported.returncode:
            assert exported.returncode == 2 and len(exported.stderr.strip().splitlines()) == 1, exported.stderr
            assert ("was deleted while being read" in exported.stderr  # gone while it was read
                    or "does not exist (removed by --keep-last" in exported.stderr)  # gone before it was read
        else:
            assert (tmp_path / "exported" / "model.safetensors").is_file()
        writer.send_signal(signal.SIGTERM)
        assert writer.finish(timeout=60).returncode == 143
    assert summary(run)["status"] == "preempted"
    assert (run / ".lock").read_text() == ""  # released: no stale holder named


def test_the_lock_dies_with_its_process(tmp_path):
    run = tmp_path / "run"
    with Started([*DISTSEQ, *LONG, "--run-dir", str(run)], tmp_path / "logs") as writer:
        writer.wait_for_line("step=5/")
        writer.send_signal(signal.SIGKILL)
        writer.finish(timeout=60)
    assert "pid" in (run / ".lock").read_text()  # the killed holder never released it by hand...
    RunDirLock(run).acquire().release()  # ...but the OS did


def test_the_lock_excludes_a_second_holder_in_the_same_process(tmp_path):
    first = RunDirLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match=f"in use by another distseq run \\(host .*, pid {os.getpid()}, since"):
        RunDirLock(tmp_path).acquire()
    first.release()
    RunDirLock(tmp_path).acquire().release()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert_ok(run_here([*LONG, "--max-steps", "3", "--keep-last", "0", "--run-dir", str(run)]))
    return run


def test_a_reader_keeps_what_it_verified_when_the_checkpoint_is_deleted(finished, tmp_path):
    import shutil

    path = tmp_path / "step-00000003"
    shutil.copytree(finished / "checkpoints" / "step-00000003", path)
    verified = read_meta(path, keep=("model.safetensors",))
    shutil.rmtree(path)  # --keep-last of a running job, right after verification
    model, cfg, meta = model_from_checkpoint(path, verified)
    assert meta["step"] == 3 and cfg.model.hidden_size == 8
    assert model(torch.zeros(1, 10, 1), None).shape == (1,)


def test_a_checkpoint_deleted_before_it_is_read_is_one_line(finished, tmp_path):
    gone = tmp_path / "step-00000003"
    with pytest.raises(CheckpointError, match="is not a checkpoint directory"):
        read_meta(gone)
    proc = run_here(["export", "--checkpoint", str(gone), "--out", str(tmp_path / "out")])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"distseq export: error: {gone} is not a checkpoint directory"]


def test_a_checkpoint_removed_by_retention_says_so_and_names_the_newest(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    *older, newest = list_checkpoints(run)
    assert older, "the fixture's run kept one checkpoint only"
    removed = older[0]
    shutil.rmtree(removed)  # as --keep-last of a running job does
    proc = run_here(["predict", "--checkpoint", str(removed), "--random", "1"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"distseq predict: error: {removed} does not exist (removed by --keep-last, or never written); the newest "
        f"there is {newest}"]
    for path in list_checkpoints(run):
        shutil.rmtree(path)
    with pytest.raises(CheckpointError, match="does not exist .*; none is left there$"):
        read_meta(removed)


def test_newest_verified_looks_again_when_the_newest_vanishes(finished, tmp_path, monkeypatch):
    import shutil

    import distseq.checkpoint.format as ckpt

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    real = ckpt.read_meta
    calls = []

    def deleting_read_meta(path, keep=()):
        calls.append(path.name)
        if path.name == "step-00000003" and len(calls) == 1:
            shutil.rmtree(path)  # deleted between listing and reading
        return real(path, keep)

    monkeypatch.setattr(ckpt, "read_meta", deleting_read_meta)
    logged = []
    path, meta, _ = newest_verified(run, logged.append)
    assert path.name == "step-00000002" and meta["step"] == 2
    assert calls == ["step-00000003", "step-00000002"] and logged == []  # vanished is not damaged
