"""A run killed in the middle of an epoch resumes with `--ckpt_path last`: the same MLflow run,
and the same number of optimizer steps as a run that was never stopped. Real processes, real
signals (SIGKILL: no chance to save anything; SIGTERM: saves where it stopped)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from medrpn.data.datamodule import LesionDataModule
from medrpn.data.synth import write_synthetic_dataset
from support import checkpoint_step

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
BATCH = 2
EVERY_N_STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_synthetic_dataset(root / "data", n_images=24, image_size=96, seed=5)
    annotations = root / "data" / "annotations.csv"
    n_train = len(LesionDataModule(str(annotations), val_fraction=0.2, test_fraction=0.0).splits["train"])
    steps_per_epoch = -(-n_train // BATCH)
    return annotations, steps_per_epoch


def _args(annotations: Path, work: Path) -> list[str]:
    config = work / "config.yaml"  # the demo recipe, saving last.ckpt every 3 steps
    config.write_text((REPO / "configs" / "demo.yaml").read_text().replace("every_n_train_steps: 50", f"every_n_train_steps: {EVERY_N_STEPS}"))
    return [
        sys.executable, "-m", "medrpn", "fit", "--config", str(config),
        "--data.annotations", str(annotations), "--data.image_size", "96", "--data.num_workers", "0",
        "--data.batch_size", str(BATCH), "--data.val_fraction", "0.2", "--data.test_fraction", "0.0",
        "--model.backbone.fpn_channels", "16", "--trainer.max_epochs", str(EPOCHS),
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.run_name", "resumed",
    ]


def _run_until_mid_epoch_checkpoint(args: list[str], work: Path, steps_per_epoch: int) -> subprocess.Popen:
    """Starts a fit and returns it once `last.ckpt` holds a step in the middle of epoch 2 or later."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = work / "demo" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        step = checkpoint_step(last)
        if step is not None and step > steps_per_epoch and step % steps_per_epoch:
            return proc
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no mid-epoch checkpoint appeared:\n{proc.communicate()[0][-3000:]}")


def _finish(args: list[str], work: Path) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_in_the_same_mlflow_run_with_the_same_step_count(data, tmp_path, sig):
    annotations, steps_per_epoch = data
    args = _args(annotations, tmp_path)
    proc = _run_until_mid_epoch_checkpoint(args, tmp_path, steps_per_epoch)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output[-3000:]
    stopped_at = checkpoint_step(tmp_path / "demo" / "checkpoints" / "last.ckpt")
    assert stopped_at < EPOCHS * steps_per_epoch
    if sig == signal.SIGTERM:  # stopped at a batch boundary and saved that very step (which may also be a periodic one)
        said = re.search(r"stopped by SIGTERM at optimizer step (\d+)", output)
        assert said and int(said.group(1)) == stopped_at, output[-3000:]

    output = _finish([*args, "--ckpt_path", "last"], tmp_path)
    assert "resuming from" in output and "medrpn fit finished." in output
    assert checkpoint_step(tmp_path / "demo" / "checkpoints" / "last.ckpt") == EPOCHS * steps_per_epoch  # as if never stopped

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = mlflow.search_runs(experiment_names=["medrpn-demo"], output_format="list")
    assert len(runs) == 1, [r.info.run_name for r in runs]  # the resumed command went on in the same run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert "ckpt_path" in run.data.tags["medrpn.resume_changed_params"]
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "val/cpm")) >= EPOCHS  # every epoch validated, in this run
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")]
    assert max(steps) < EPOCHS * steps_per_epoch and min(steps) < stopped_at < max(steps)  # logged before and after
