"""One tiny real `medrpn fit` (a process of its own, as a user runs it), shared by the evaluation tests.

test_evaluate, test_compare and test_operating_point need a trained checkpoint and its MLflow
run; `trained_run` makes them once per pytest session (a few steps on 16 generated DICOM images
at 128 px) and hands every module the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from medrpn.data.synth import write_synthetic_dataset
from support import run_medrpn

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "eval-e2e"
REGISTERED_MODEL = "demo-detector"


@dataclass(frozen=True)
class TrainedRun:
    """Where the run's files are: its folder, checkpoint, config, annotations and MLflow store."""

    work: Path
    ckpt: Path
    config: Path
    annotations: Path
    tracking_uri: str
    output: str


_KEY = pytest.StashKey[TrainedRun]()


# `medrpn ARGS` in a process of its own, as the test modules call it (support.run_medrpn).
medrpn = run_medrpn


def _fit(work: Path) -> TrainedRun:
    write_synthetic_dataset(work / "data", n_images=16, image_size=128, seed=11)
    annotations = work / "data" / "annotations.csv"
    # The demo recipe at test size; written out so `medrpn evaluate --config` finds the same data.
    config = work / "config.yaml"
    config.write_text(
        (REPO / "configs" / "demo.yaml").read_text()
        .replace("demo/data/annotations.csv", str(annotations))
        .replace("image_size: 256", "image_size: 128")
        .replace("val_fraction: 0.15", "val_fraction: 0.25")
        .replace("test_fraction: 0.15", "test_fraction: 0.25")
        .replace("num_workers: 2", "num_workers: 0")
        .replace("batch_size: 8", "batch_size: 4")
    )
    result = medrpn(
        "fit",
        "--config", str(config),
        "--model.backbone.fpn_channels", "32",
        "--model.bootstrap_samples", "200",
        "--model.anchors", "auto",  # planned from the training boxes (checked in test_anchor_planning)
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.logger.init_args.run_name", RUN_NAME,
        # the best checkpoint also becomes a registered model version (checked in test_registry)
        "--trainer.logger.init_args.registered_model", REGISTERED_MODEL,
        "--trainer.logger.init_args.registered_model_alias", "candidate",
        cwd=work,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    ckpt = work / "demo" / "checkpoints" / "best.ckpt"
    assert ckpt.is_file(), output[-4000:]
    return TrainedRun(work, ckpt, config, annotations, f"sqlite:///{work / 'mlruns.db'}", output)


def trained_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """The session's trained run (made on first use)."""
    stash = request.config.stash
    if _KEY not in stash:
        stash[_KEY] = _fit(tmp_path_factory.mktemp("trained_run"))
    return stash[_KEY]
