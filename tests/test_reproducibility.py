"""Same seed, same config, same machine: the same training, to the last digit, on CPU."""

from __future__ import annotations

from pathlib import Path

import mlflow

from medrpn.data.synth import write_synthetic_dataset
from support import run_medrpn

REPO = Path(__file__).resolve().parents[1]


def _fit(data: Path, cwd: Path, seed: int) -> dict[str, float]:
    cwd.mkdir()
    result = run_medrpn(
        "fit", "--config", str(REPO / "configs" / "demo.yaml"),
         "--seed_everything", str(seed), "--data.annotations", str(data / "annotations.csv"),
         "--data.image_size", "128", "--data.num_workers", "2", "--data.val_fraction", "0.25",
         "--data.test_fraction", "0", "--model.backbone.fpn_channels", "32", "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "3", "--trainer.enable_progress_bar", "false",
         "--data.augment.mosaic", "0.5",  # mosaic's partner images are drawn at random too
        cwd=cwd,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlruns.db'}")
    (run,) = mlflow.search_runs(experiment_names=["medrpn-demo"], output_format="list")
    return {k: v for k, v in run.data.metrics.items() if k.startswith(("train/", "val/"))}


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path):
    write_synthetic_dataset(tmp_path / "data", n_images=24, image_size=128, seed=4)
    first = _fit(tmp_path / "data", tmp_path / "a", seed=7)
    second = _fit(tmp_path / "data", tmp_path / "b", seed=7)
    assert "train/loss_epoch" in first and "val/cpm" in first
    assert first == second  # augmentation in worker processes included, mosaic's draws too
    other = _fit(tmp_path / "data", tmp_path / "c", seed=8)
    assert other["train/loss_epoch"] != first["train/loss_epoch"]
