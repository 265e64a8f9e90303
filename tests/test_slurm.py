"""launch/slurm.sbatch on a real SLURM: two fake nodes on loopback, preempted with USR1, requeued, resumed.

The cluster (munged, slurmctld, two slurmd) is started in a temporary directory and every daemon it
started is stopped by PID. .ci/run installs Debian's SLURM packages when it runs as root; without
them the test is skipped with that reason.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, checkpoint_weights, free_port, summary

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scancel", "squeue", "scontrol")
missing = [d for d in DAEMONS if not shutil.which(d) and not Path("/usr/sbin", d).exists()]
if missing or os.geteuid() != 0 or not Path("/etc/munge/munge.key").exists():
    pytest.skip(f"no local SLURM (missing: {', '.join(missing) or 'root or /etc/munge/munge.key'}; "
                ".ci/run installs slurmctld slurmd slurm-client munge as root)", allow_module_level=True)

CONF = """ClusterName=distseqtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld}
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/linear
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1} CPUs={cpus} State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def sbin(name):
    return shutil.which(name) or str(Path("/usr/sbin", name))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(CONF.format(root=root, ctld=free_port(), n1=free_port(), n2=free_port(), cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []
    try:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            daemons.append(subprocess.Popen(["setpriv", "--reuid", "munge", "--regid", "munge", "--clear-groups",
                                             sbin("munged"), "-F"]))
            time.sleep(0.5)
        daemons.append(subprocess.Popen([sbin("slurmctld"), "-D", "-i"], env=env, stderr=subprocess.DEVNULL))
        time.sleep(1)
        for node in ("n1", "n2"):
            daemons.append(subprocess.Popen([sbin("slurmd"), "-D", "-N", node], env=env, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-3000:]
            time.sleep(0.5)
        yield env
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()


ARGS = ["--max-steps", "600", "--checkpoint-every", "50", "--log-every", "20", "--eval-every", "0",
        "--eval-size", "64", "--global-batch-size", "64", "--hidden-size", "16", "--no-progress", "--precision", "no"]


# A job a test interrupts after step 100 runs at least this long per step, so the 500 steps left outlast the
# signal's way through slurmctld on a loaded machine (the sleep changes no number the test compares).
INTERRUPTED = {"DISTSEQ_SLOW_RANK": "0:10"}


def submit(slurm, run_dir: Path, out_dir: Path, **extra_env: str) -> str:
    env = {**slurm, "DISTSEQ_PYTHON": sys.executable, "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", **extra_env}
    out_dir.mkdir(exist_ok=True)
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--chdir={REPO}", f"--output={out_dir}/job-%j.txt",
                           str(REPO / "launch" / "slurm.sbatch"), *ARGS, "--run-dir", str(run_dir)],
                          env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip().split(";")[0]


def wait_gone(slurm, job: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], env=slurm, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still queued or running"
        time.sleep(1)


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory) -> Path:
    """A job never interrupted: what the others must end like."""
    tmp = tmp_path_factory.mktemp("reference")
    job = submit(slurm, tmp / "run", tmp / "out")
    wait_gone(slurm, job)
    assert summary(tmp / "run")["status"] == "complete" and summary(tmp / "run")["world_size"] == 2
    return tmp / "run"


def wait_for_line(log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text()):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no job output"
        time.sleep(0.2)


def assert_same_weights(reference: Path, run_dir: Path) -> None:
    a = checkpoint_weights(reference / "checkpoints" / "step-00000600")
    b = checkpoint_weights(run_dir / "checkpoints" / "step-00000600")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_crashed_rank_heals_in_place_without_a_requeue(slurm, reference, tmp_path):
    """kill -9 of one node's rank: the launchers restart every rank (--max_restarts), the job never leaves."""
    import psutil

    run_dir = tmp_path / "crashed"
    job = submit(slurm, run_dir, tmp_path / "out", **INTERRUPTED)
    log = tmp_path / "out" / f"job-{job}.txt"
    wait_for_line(log, "step=100/")
    ranks = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and "distseq.cli" in p.info["cmdline"]
             and "train" in p.info["cmdline"] and "launch" not in p.info["cmdline"]
             and str(run_dir) in p.info["cmdline"]]
    assert len(ranks) == 2
    ranks[-1].kill()
    wait_gone(slurm, job)
    text = log.read_text()
    assert "restart 1" not in text and "scontrol requeue" not in text  # healed inside the job
    assert "resuming from" in text and "distseq-slurm: ranks exited with 0" in text
    result = summary(run_dir)
    assert result["status"] == "complete" and result["step"] == 600 and result["world_size"] == 2
    assert_same_weights(reference, run_dir)


def test_preempted_job_is_requeued_and_ends_like_an_uninterrupted_one(slurm, reference, tmp_path):

    run_dir = tmp_path / "preempted"
    job = submit(slurm, run_dir, tmp_path / "out", **INTERRUPTED)
    log = tmp_path / "out" / f"job-{job}.txt"
    wait_for_line(log, "step=100/")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
    wait_gone(slurm, job)

    text = log.read_text()
    assert "distseq-slurm: USR1 received" in text and f"scontrol requeue {job}: ok" in text
    assert f"distseq-slurm: job {job} restart 1" in text and "resuming from" in text
    result = summary(run_dir)
    assert result["status"] == "complete" and result["step"] == 600 and result["world_size"] == 2
    stopped = int(result["resumed_from"].rsplit("-", 1)[1])
    assert 100 <= stopped < 600
    assert_same_weights(reference, run_dir)


def test_a_sweep_on_slurm_runs_a_task_per_point_and_a_preempted_one_is_requeued(slurm, tmp_path):
    """backend: slurm submits one array; USR1 to one task (SLURM's warning) saves it, requeues it and it resumes;
    `distseq sweep` again submits nothing while the array runs and nothing once every point is complete."""
    import yaml

    options = {"max-steps": 600, "checkpoint-every": 50, "log-every": 20, "eval-every": 0, "eval-size": 64,
               "global-batch-size": 64, "hidden-size": 16, "precision": "no", "log-with": "none"}
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": {"options": options}, "grid": {"seed": [0, 1, 2]}, "backend": "slurm"}))
    root = tmp_path / "sweep"
    env = {**slurm, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **INTERRUPTED}
    sweep = [sys.executable, "-m", "distseq.cli", "sweep", str(spec), "--dir", str(root)]
    submitted = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.split("submitted job array ")[1].split(":")[0]
    log = root / "logs" / f"{job}_1.out"
    wait_for_line(log, "step=100/")
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job}_1"], env=slurm, check=True)
    again = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode == 0 and f"job array {job} is still queued or running: nothing submitted" in again.stdout
    wait_gone(slurm, job, timeout=300)

    text = log.read_text()
    assert "distseq-sweep: USR1 received" in text and "restart 1: seed=1" in text and "resuming from" in text
    for seed in (0, 1, 2):
        result = summary(root / f"seed={seed}")
        assert result["status"] == "complete" and result["step"] == 600
    alone = tmp_path / "alone"  # seed=1's options, never stopped
    argv = [a for p in json.loads((root / "sweep.json").read_text())["points"] if p["name"] == "seed=1"
            for a in p["argv"]]
    proc = subprocess.run([sys.executable, "-m", "distseq.cli", "train", *argv, "--run-dir", str(alone)],
                          env={**slurm, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (checkpoint_weights(d / "checkpoints" / "step-00000600") for d in (alone, root / "seed=1"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    done = subprocess.run(sweep, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and "sweep: 0 of 3 point(s) to run" in done.stdout
    assert "nothing to submit (3 complete)" in done.stdout
