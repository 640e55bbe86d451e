"""`model.init_weights`: a fit that starts from another run's weights (fine-tuning), tensor by
tensor where name and shape match, the rest listed; a resumed fit goes on from its own checkpoint.

Real parts: Lightning fits on synthetic DICOM phantoms, with learning rate 0 so that the weights a
fit starts from are still there to compare at its end (AdamW's step and decay are both scaled by
the learning rate)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from medrpn.data.datamodule import LesionDataModule
from medrpn.errors import MedrpnError
from medrpn.training.init_weights import load_matching_weights
from medrpn.data.synth import CLASS_NAMES, write_synthetic_dataset
from medrpn.training.lightning_module import LesionDetectionModule
from support import SIZE, TINY


TINY = {**TINY, "bootstrap_samples": 10}
FROZEN = {"lr": 0.0, "warmup_steps": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("init_weights")
    write_synthetic_dataset(root / "data", n_images=8, image_size=SIZE, seed=11)
    return root / "data" / "annotations.csv"


def _module(class_names: list[str], seed: int, **settings) -> LesionDetectionModule:
    torch.manual_seed(seed)
    return LesionDetectionModule(class_names=class_names, **{**TINY, **settings})


def _save(module: LesionDetectionModule, path: Path) -> Path:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def _fit(module: LesionDetectionModule, data: Path, root: Path, steps: int, ckpt_path: Path | None = None) -> L.Trainer:
    datamodule = LesionDataModule(str(data), image_size=SIZE, val_fraction=0.25, test_fraction=0.0, batch_size=2, num_workers=0)
    trainer = L.Trainer(
        max_steps=steps, limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=True, enable_model_summary=False,  # the bar must not swallow the report
        accelerator="cpu", default_root_dir=root,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_matching_tensors_are_loaded_and_the_others_listed(tmp_path):
    source = _module(["a", "b"], seed=0)
    path = _save(source, tmp_path / "two_classes.ckpt")
    target = _module(["a", "b", "c"], seed=1)  # one more class: another class layer
    before = _parameters(target)

    report = load_matching_weights(target, path)

    after, given = _parameters(target), _parameters(source)
    class_layers = {n for n in after if ".box_predictor." in n}
    assert class_layers and all(name in dict(report.kept) for name in class_layers)
    assert "shape [3, " in dict(report.kept)["model.roi_heads.box_predictor.cls_score.weight"]
    for name in after:
        expected = before[name] if name in class_layers else given[name]
        assert torch.equal(after[name], expected), name
    assert set(report.loaded) == set(target.state_dict()) - set(dict(report.kept)) and not report.unused
    assert f"started from {path}" in report.summary() and "left as built: model.roi_heads.box_predictor" in report.summary()


def test_files_that_cannot_start_a_fit_are_named(tmp_path):
    target = _module(["a"], seed=0)
    with pytest.raises(MedrpnError, match="missing.ckpt: checkpoint to start from .* not found"):
        load_matching_weights(target, tmp_path / "missing.ckpt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.ckpt")
    with pytest.raises(MedrpnError, match="plain.ckpt: .* has no state_dict"):
        load_matching_weights(target, tmp_path / "plain.ckpt")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3, 3)}}, tmp_path / "other.ckpt")
    with pytest.raises(MedrpnError, match="other.ckpt: none of the 1 tensors .* fits this model"):
        load_matching_weights(target, tmp_path / "other.ckpt")


def test_a_fit_starts_from_the_weights_and_a_resumed_fit_from_its_own(data, tmp_path, capsys):
    # another input scale and other anchor sizes: the shapes are the same, so every tensor loads
    classes = list(CLASS_NAMES)
    source = _module(classes, seed=0)
    path = _save(source, tmp_path / "small_input.ckpt")
    fine_tuned = _module(classes, seed=1, anchors={"sizes": [[12.0], [24.0], [48.0], [96.0]]},
                         optim=FROZEN, init_weights=str(path))
    trainer = _fit(fine_tuned, data, tmp_path / "fine", steps=2)
    assert trainer.global_step == 2
    printed = capsys.readouterr().out
    assert f"started from {path}" in printed and "0 left as built" in printed
    given = _parameters(source)
    assert all(torch.equal(p, given[name]) for name, p in _parameters(fine_tuned).items())
    assert fine_tuned.hparams["init_weights"] == str(path)

    # resuming: the checkpoint's weights, not the init file's (which may be gone by then)
    resumed_from = _module(classes, seed=2, optim=FROZEN)
    _fit(resumed_from, data, tmp_path / "first", steps=1).save_checkpoint(tmp_path / "last.ckpt")
    resumed = _module(classes, seed=3, optim=FROZEN, init_weights=str(tmp_path / "deleted.ckpt"))
    trainer = _fit(resumed, data, tmp_path / "resumed", steps=2, ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 2 and "started from" not in capsys.readouterr().out
    own = _parameters(resumed_from)
    assert all(torch.equal(p, own[name]) for name, p in _parameters(resumed).items())
