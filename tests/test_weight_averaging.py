"""`ModelEMA`: the averaged weights are validated, saved as the checkpoint's weights and scored by
the held-out test that ends a fit; a resumed fit gets back both the raw weights and the average.

Real parts: Lightning fits of a small detector on synthetic DICOM phantoms, real checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from medrpn.data.datamodule import LesionDataModule
from medrpn.errors import ConfigError
from medrpn.data.synth import CLASS_NAMES, write_synthetic_dataset
from medrpn.training.lightning_module import LesionDetectionModule
from medrpn.training.weight_averaging import ModelEMA, ramped_decay
from support import SIZE, TINY


TINY = {**TINY, "bootstrap_samples": 10, "optim": {"lr": 0.01, "warmup_steps": 0}}  # large steps: the average and the weights part at once


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ema")
    write_synthetic_dataset(root / "data", n_images=8, image_size=SIZE, seed=12)
    return root / "data" / "annotations.csv"


def _datamodule(data: Path) -> LesionDataModule:
    return LesionDataModule(str(data), image_size=SIZE, val_fraction=0.25, test_fraction=0.25, batch_size=2, num_workers=0)


def _trainer(root: Path, steps: int, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, limit_val_batches=1, num_sanity_val_steps=0, logger=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=root,
    )


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class _WeightsAtTrainStart(Callback):
    """Records the model's and the average's parameters when training (re)starts."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, ModelEMA))
        self.model = _parameters(pl_module)
        self.average = _parameters(ema._average_model.module)


def test_the_average_is_checkpointed_tested_and_resumed(data, tmp_path):
    torch.manual_seed(0)
    module = LesionDetectionModule(class_names=list(CLASS_NAMES), **TINY)
    saver = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best")
    trainer = _trainer(tmp_path, steps=4, callbacks=[ModelEMA(decay=0.5), saver])
    trainer.fit(module, datamodule=_datamodule(data))

    checkpoint = torch.load(saver.best_model_path, map_location="cpu", weights_only=True)
    average, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    parted = [name for name, _ in module.named_parameters() if not torch.equal(average[name], raw[name])]
    assert parted, "the average equals the weights: nothing to tell apart"

    # the held-out test that ends `medrpn fit` scores the weights validation chose: the average
    trainer.test(module, datamodule=_datamodule(data), ckpt_path=saver.best_model_path, verbose=False)
    tested = _parameters(module)
    assert all(torch.equal(tested[name], average[name]) for name in parted)

    # a resumed fit goes on from the raw weights, and its average from the saved average
    torch.manual_seed(1)
    resumed = LesionDetectionModule(class_names=list(CLASS_NAMES), **TINY)
    probe = _WeightsAtTrainStart()
    _trainer(tmp_path / "resumed", steps=5, callbacks=[ModelEMA(decay=0.5), probe]).fit(
        resumed, datamodule=_datamodule(data), ckpt_path=saver.best_model_path
    )
    assert all(torch.equal(probe.model[name], raw[name]) for name in probe.model)
    assert all(torch.equal(probe.average[name], average[name]) for name in probe.average)


def test_decay_outside_zero_to_one_is_refused():
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="ModelEMA.decay must be in"):
            ModelEMA(decay=decay)


def test_the_decay_ramps_up_to_its_ceiling():
    assert ramped_decay(0.998, 1) == pytest.approx(2 / 11)
    assert ramped_decay(0.998, 100) == pytest.approx(101 / 110)
    assert ramped_decay(0.998, 10_000) == 0.998
    ema = ModelEMA(decay=0.998)
    averages, currents = [torch.zeros(3), torch.zeros(2, dtype=torch.int64)], [torch.ones(3), torch.full((2,), 11)]
    ema._update(averages[:1], currents[:1], torch.tensor(1))
    ema._update(averages[1:], currents[1:], torch.tensor(1))  # integer buffers (BatchNorm's batch count)
    torch.testing.assert_close(averages[0], torch.full((3,), 9 / 11))
    torch.testing.assert_close(averages[1], torch.full((2,), 9))
