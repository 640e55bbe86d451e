"""Distributed launches beyond Lightning's own: `torchrun`, SLURM tasks, and a rank that dies.

Real processes on CPU (gloo): torchrun starts two `python -m medrpn fit` workers that make one
MLflow run; two tasks started the way `srun` starts them (each with SLURM's variables, running the
documented command with configs/multinode.yaml) train as one job; in a Lightning-launched
2-process run one rank is killed with SIGKILL in the middle of training, and the survivor must
stop with a clear error within a bounded time, never hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from medrpn.data.synth import write_synthetic_dataset
from support import checkpoint_step, free_port

REPO = Path(__file__).resolve().parents[1]
BOUND_S = 90  # a dead peer must stop the survivor within this (gloo notices at the next collective)


@pytest.fixture(scope="module")
def annotations(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-launch")
    write_synthetic_dataset(root / "data", n_images=24, image_size=96, seed=7)
    return root / "data" / "annotations.csv"


def _fit_args(annotations: Path, work: Path, *extra: str) -> list[str]:
    config = work / "config.yaml"  # the demo recipe, saving last.ckpt at every step
    config.write_text((REPO / "configs" / "demo.yaml").read_text().replace("every_n_train_steps: 50", "every_n_train_steps: 1"))
    return [
        "fit", "--config", str(config), "--data.annotations", str(annotations), "--data.image_size", "96",
        "--data.num_workers", "0", "--data.batch_size", "2", "--data.val_fraction", "0.25", "--data.test_fraction", "0.0",
        "--model.backbone.fpn_channels", "16", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_torchrun_launch_makes_one_run(annotations, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "medrpn",
        *_fit_args(annotations, tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"),
    ]
    result = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # torchrun made the processes; Lightning joined them instead of launching its own
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert output.count("medrpn fit finished.") == 1
    assert (tmp_path / "demo" / "checkpoints" / "best.ckpt").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = mlflow.search_runs(experiment_names=["medrpn-demo"], output_format="list")
    assert len(runs) == 1 and "val/cpm" in runs[0].data.metrics


def test_slurm_tasks_train_as_one_job_with_the_multinode_config(annotations, tmp_path):
    """What `srun` does on one node with --ntasks-per-node=2: start the command twice, with SLURM's
    variables. Lightning must take ranks from them (else each task would launch its own second
    process and the job would not finish)."""
    command = [
        sys.executable, "-m", "medrpn",
        *_fit_args(annotations, tmp_path, "--config", str(REPO / "configs" / "multinode.yaml")),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.num_nodes", "1",
        "--trainer.precision", "32-true", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--ckpt_path", "last",  # as in configs/slurm_fit.sbatch: nothing to resume yet, so it starts fresh
    ]
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "medrpn-fit", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(free_port()),
    }
    tasks = [
        subprocess.Popen(
            command, cwd=tmp_path, env={**_env(), **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = [task.communicate(timeout=600)[0] for task in tasks]
    for task, output in zip(tasks, outputs):
        assert task.returncode == 0, output[-4000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert sum(o.count("medrpn fit finished.") for o in outputs) == 1
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert len(mlflow.search_runs(experiment_names=["medrpn-demo"], output_format="list")) == 1


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank-1 process through /proc")
@pytest.mark.parametrize("victim", ["rank1", "rank0"])
def test_a_killed_rank_stops_the_other_with_a_clear_error_in_bounded_time(annotations, tmp_path, victim):
    """rank1: a worker dies, rank 0 (the command) must stop. rank0: the command itself is killed,
    and the rank it launched must not be left waiting for it."""
    command = [sys.executable, "-m", "medrpn", *_fit_args(annotations, tmp_path, "--trainer.max_epochs", "50")]
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    survivor = None
    try:
        deadline = time.monotonic() + 300
        while (checkpoint_step(tmp_path / "demo" / "checkpoints" / "last.ckpt") or 0) < 2:  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        children = _children(proc.pid)
        assert len(children) == 1, children  # Lightning's launcher: rank 0 is the command, rank 1 its child
        victim_pid, survivor = (children[0], proc.pid) if victim == "rank1" else (proc.pid, children[0])
        os.kill(victim_pid, signal.SIGKILL)
        killed = time.monotonic()
        while _alive(survivor) and time.monotonic() - killed < BOUND_S:
            time.sleep(0.2)
        took = time.monotonic() - killed
        output = proc.communicate(timeout=30)[0]  # the pipe closes once every rank has exited
    finally:
        for pid in [proc.pid, survivor]:
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert took < BOUND_S, f"the surviving rank still ran {BOUND_S} s after the other was killed"
    assert "medrpn: error: a training process stopped" in output, output[-3000:]
    if victim == "rank1":
        assert proc.returncode == 2


def test_the_launcher_reports_a_killed_rank_and_stops_the_others(tmp_path):
    """observe_children, the observer rank 0 runs over the ranks it launched, on real processes:
    one child is SIGKILLed, the other must be stopped and the launcher must exit 2 with one line."""
    script = """
import subprocess, sys, time
from medrpn.training.distributed import observe_children
victim = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(bystander.pid, flush=True)
observe_children([victim, bystander], poll_s=0.1)
time.sleep(60)
"""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, env=_env())
    assert time.monotonic() - started < 30
    assert done.returncode == 2, done.stderr
    assert "medrpn: error: a training process stopped: rank 1" in done.stderr
    assert "was killed by SIGKILL" in done.stderr
    bystander = int(done.stdout.split()[0])
    time.sleep(0.5)
    assert not _alive(bystander)
