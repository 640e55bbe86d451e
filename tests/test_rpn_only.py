"""RPN-only mode: the RPN trained and evaluated alone (proposal recall, FROC of the candidates),
and its proposals exported as JSON for a second stage of the user's own.

Real parts throughout: a small detector on synthetic DICOM phantoms, a real `medrpn fit` in a
process of its own, then `medrpn predict --proposals` on its checkpoint (one DICOM study and one PNG of
another size and shape than the training images).
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medrpn.cli import main as medrpn_main
from medrpn.data.datamodule import LesionDataModule
from medrpn.data.io import ReadConfig, read_image
from medrpn.data.transforms import build_transform
from medrpn.errors import ConfigError
from medrpn.outputs import ImageFindings
from medrpn.outputs.proposals import image_proposals, write_proposals
from medrpn.inference.predict import load_checkpoint, predict_files
from medrpn.data.synth import write_synthetic_dataset
from medrpn.training.lightning_module import RPN_LOSS_NAMES, LesionDetectionModule
from support import run_medrpn

REPO = Path(__file__).resolve().parents[1]
SIZE = 96
SMALL = dict(
    backbone={"name": "resnet18", "fpn_channels": 16, "returned_stages": [1, 2, 3]},
    anchors={"sizes": [[8.0], [16.0], [32.0], [64.0]]},
    rpn={"batch_size_per_image": 64, "pre_nms_top_n_train": 200, "post_nms_top_n_train": 100,
         "pre_nms_top_n_test": 100, "post_nms_top_n_test": 100},
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rpn_only")
    write_synthetic_dataset(root / "data", n_images=12, image_size=SIZE, seed=3)
    return root / "data" / "annotations.csv"


def _datamodule(annotations: Path) -> LesionDataModule:
    return LesionDataModule(
        str(annotations), image_size=SIZE, val_fraction=0.25, test_fraction=0.25, batch_size=4, num_workers=0
    )


def test_rpn_only_module_trains_and_validates_on_proposals(data):
    torch.manual_seed(0)
    dm = _datamodule(data)
    module = LesionDetectionModule(class_names=list(dm.class_names), rpn_only=True, **SMALL)
    assert module.model.roi_heads is None
    assert not [name for name, _ in module.named_parameters() if "roi" in name]
    assert module.class_names == ["lesion"] and module.hparams["class_names"] == list(dm.class_names)

    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert any(len(t["boxes"]) for t in batch["targets"])
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.train()
    history = []
    for _ in range(10):
        losses = module.model(batch["images"], batch["targets"]).losses
        assert set(losses) == set(RPN_LOSS_NAMES)
        loss = sum(losses[name] for name in module.loss_names)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-3:]) < 0.85 * sum(history[:3]), history

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    trainer.validate(module, datamodule=dm, verbose=False)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in ("val/rpn_recall100", "val/cpm", "val/froc_1fp", "val/map50"):
        assert key in logged and 0.0 <= logged[key] <= 1.0, (key, logged)
    # one class-agnostic class: no per-class figures under the data's class names
    assert not [k for k in logged if k.count("/") > 1], logged
    assert module.operating_point is not None  # picked on the objectness scores



@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory) -> Path:
    """A real one-epoch `medrpn fit --model.rpn_only true`; returns the best checkpoint."""
    work = tmp_path_factory.mktemp("fit")
    config = work / "config.yaml"
    config.write_text(
        (REPO / "configs" / "demo.yaml").read_text()
        .replace("demo/data/annotations.csv", str(data))
        .replace("image_size: 256", f"image_size: {SIZE}")
        .replace("val_fraction: 0.15", "val_fraction: 0.25")
        .replace("test_fraction: 0.15", "test_fraction: 0.25")
        .replace("num_workers: 2", "num_workers: 0")
    )
    result = run_medrpn(
        "fit", "--config", str(config), "--model.rpn_only", "true",
        "--model.backbone.fpn_channels", "16", "--model.bootstrap_samples", "20",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", "cpu", "--trainer.logger.init_args.log_model", "false",
        cwd=work,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "RPN recall@100 = " in output and "n/a" not in output.split("RPN recall@100 = ")[1][:5], output[-2000:]
    ckpt = work / "demo" / "checkpoints" / "best.ckpt"
    assert ckpt.is_file(), output[-4000:]
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["rpn_only"] is True
    assert not [k for k in saved["state_dict"] if "roi_heads" in k]
    return ckpt


def test_an_rpn_only_checkpoint_does_not_load_into_a_full_model(fitted, data):
    saved = torch.load(fitted, map_location="cpu", weights_only=True)["hyper_parameters"]
    full = LesionDetectionModule(**{**saved, "rpn_only": False})
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    with pytest.raises(ConfigError, match=r"trained with other model settings.*rpn_only: checkpoint True, here False"):
        trainer.validate(full, datamodule=_datamodule(data), ckpt_path=str(fitted), verbose=False)


def test_predict_writes_proposals_in_original_pixels(fitted, data, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "dicom").mkdir(parents=True)
    dicom = sorted((data.parent / "images").glob("*.dcm"))[0]
    (inputs / "dicom" / dicom.name).write_bytes(dicom.read_bytes())
    # A PNG of another size and shape than the training images: 120 rows x 200 columns.
    pixels = read_image(dicom).array
    canvas = np.zeros((120, 200), dtype=np.uint8)
    canvas[10 : 10 + SIZE, 50 : 50 + SIZE] = np.round(pixels * 255).astype(np.uint8)
    PILImage.fromarray(canvas).save(inputs / "wide.png")

    out_dir = tmp_path / "out"
    with redirect_stdout(io.StringIO()):
        medrpn_main(["predict", "--ckpt", str(fitted), "--input", str(inputs), "--output", str(out_dir),
                     "--num-workers", "0", "--proposals"])

    module, data_settings = load_checkpoint(fitted)
    assert module.model.rpn_only and data_settings["image_size"] == SIZE
    read_config = ReadConfig.parse(data_settings.get("read"))
    max_proposals = module.hparams["rpn"]["post_nms_top_n_test"]

    # the PNG folder: the scale is 96 / 200 (the longer side), boxes come back to 200 x 120 pixels
    document = json.loads((out_dir / "proposals.json").read_text())
    assert document["schema_version"] == "1.1" and document["study_instance_uid"] is None
    (image,) = document["images"]
    assert (image["source"], image["height"], image["width"]) == ("wide.png", 120, 200)
    assert image["scale"] == pytest.approx(SIZE / 200) and image["input_size"] == SIZE
    assert image["pixel_spacing_mm"] is None and image["sop_instance_uid"] is None
    proposals = image["proposals"]
    assert 0 < len(proposals) <= max_proposals
    scores = [p["score"] for p in proposals]
    assert scores == sorted(scores, reverse=True)
    assert all(p["box_mm"] is None for p in proposals)
    # the same image through the network by hand, boxes divided by the hand-computed scale
    net_input = build_transform(SIZE)(image=read_image(inputs / "wide.png", None, read_config).array,
                                      bboxes=np.zeros((0, 4)), labels=[])["image"]
    with torch.no_grad():
        out = module(torch.from_numpy(np.ascontiguousarray(net_input, dtype=np.float32))[None, None])
    expected = out.proposals[0] * (200 / SIZE)
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 200)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 120)
    inside = ((expected[:, 2] - expected[:, 0]) >= 1) & ((expected[:, 3] - expected[:, 1]) >= 1)
    expected, expected_scores = expected[inside], out.proposal_scores[0][inside]
    assert len(proposals) == len(expected)
    np.testing.assert_allclose([p["box_px"] for p in proposals], expected.numpy(), atol=0.02)
    np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-4)
    # padding right of the image holds no proposal: every box ends inside the 200 x 120 image
    assert max(p["box_px"][2] for p in proposals) <= 200 and max(p["box_px"][3] for p in proposals) <= 120

    # the DICOM study: UIDs, millimetres from the 0.5 mm spacing, and findings of the one class
    (study,) = [p for p in out_dir.iterdir() if p.is_dir()]
    document = json.loads((study / "proposals.json").read_text())
    (image,) = document["images"]
    assert document["study_instance_uid"] == study.name and image["sop_instance_uid"]
    assert image["pixel_spacing_mm"] == [0.5, 0.5] and image["scale"] == pytest.approx(1.0)
    for p in image["proposals"]:
        np.testing.assert_allclose(p["box_mm"], np.array(p["box_px"]) * 0.5, atol=0.01)
        assert p["size_mm"] == pytest.approx([p["box_mm"][2] - p["box_mm"][0], p["box_mm"][3] - p["box_mm"][1]], abs=0.02)
    findings = json.loads((study / "findings.json").read_text())
    assert findings["model"]["class_names"] == ["lesion"]
    assert document["model"]["checkpoint_sha256"] == findings["model"]["checkpoint_sha256"]
    # RPN-only findings are the proposals at or above the threshold (scores rounded to 4 decimals)
    found = findings["images"][0]["findings"]
    threshold = findings["model"]["score_threshold"]
    assert {f["label"] for f in found} <= {"lesion"}
    above = [p for p in image["proposals"] if p["score"] >= threshold - 1e-4]
    assert sum(p["score"] >= threshold + 1e-4 for p in image["proposals"]) <= len(found) <= len(above)
    assert [f["box_px"] for f in found] == [p["box_px"] for p in above[: len(found)]]


def test_predict_takes_other_proposal_settings_for_the_export_and_records_them(fitted, data, tmp_path):
    (tmp_path / "in").mkdir()
    dicom = sorted((data.parent / "images").glob("*.dcm"))[0]
    (tmp_path / "in" / dicom.name).write_bytes(dicom.read_bytes())
    trained = torch.load(fitted, map_location="cpu", weights_only=True)["hyper_parameters"]["rpn"]

    def export(name: str, *flags: str) -> tuple[dict, dict, str]:
        with redirect_stdout(io.StringIO()) as printed:
            medrpn_main(["predict", "--ckpt", str(fitted), "--input", str(tmp_path / "in"),
                         "--output", str(tmp_path / name), "--num-workers", "0", "--proposals", *flags])
        (study,) = [p for p in (tmp_path / name).iterdir() if p.is_dir()]
        findings = json.loads((study / "findings.json").read_text())
        return json.loads((study / "proposals.json").read_text()), findings, printed.getvalue()

    as_trained, findings, printed = export("as_trained")
    assert as_trained["model"]["proposal_settings"] == findings["model"]["proposal_settings"] == {
        "proposals_per_image": trained["post_nms_top_n_test"], "pre_nms_per_level": trained["pre_nms_top_n_test"],
        "nms_thresh": trained["nms_thresh"], "test_flips": [], "changed": [],
    }
    assert "proposal settings changed" not in printed
    (base,) = as_trained["images"]
    assert len(base["proposals"]) > 5

    # fewer proposals: the same NMS, so the best five of the trained settings' list
    fewer, findings, printed = export("fewer", "--proposals-per-image", "5")
    (image,) = fewer["images"]
    assert image["proposals"] == base["proposals"][:5]
    assert findings["model"]["proposal_settings"]["changed"] == ["proposals_per_image"]
    assert f"--proposals-per-image {trained['post_nms_top_n_test']} -> 5" in printed

    # a looser NMS over more places keeps boxes the trained NMS suppressed
    looser, findings, printed = export("looser", "--proposal-nms", "0.95", "--proposals-per-image", "1000",
                                       "--test-flips", "horizontal")
    settings = looser["model"]["proposal_settings"]
    assert (settings["nms_thresh"], settings["proposals_per_image"], settings["test_flips"]) == (0.95, 1000, ["horizontal"])
    assert settings["changed"] == ["proposals_per_image", "nms_thresh", "test_flips"]
    assert findings["model"]["proposal_settings"] == settings
    assert len(looser["images"][0]["proposals"]) > len(base["proposals"])
    assert f"--proposal-nms {trained['nms_thresh']} -> 0.95" in printed and "operating point" in printed

    for flags, message in [
        (dict(proposal_nms=0.0), r"--proposal-nms must be an IoU in \(0, 1\]"),
        (dict(proposals_per_image=0), "--proposals-per-image must be a whole number of at least 1"),
        (dict(test_flips=["diagonal"]), "rpn.test_flips: 'diagonal'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            predict_files(fitted, tmp_path / "in", tmp_path / "bad", num_workers=0, **flags)
    assert not (tmp_path / "bad").exists()


def test_a_full_detector_also_exports_its_proposals(tmp_path):
    torch.manual_seed(0)
    module = LesionDetectionModule(class_names=["nodule", "spiculated"], **SMALL)
    ckpt = tmp_path / "full.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": {"image_size": 64}}, ckpt)
    (tmp_path / "in").mkdir()
    PILImage.fromarray((np.random.default_rng(0).random((80, 50)) * 255).astype(np.uint8)).save(tmp_path / "in" / "tall.png")
    with redirect_stdout(io.StringIO()):
        report = predict_files(ckpt, tmp_path / "in", tmp_path / "out", num_workers=0, proposals=True)
    assert tmp_path / "out" / "proposals.json" in report.written
    (image,) = json.loads((tmp_path / "out" / "proposals.json").read_text())["images"]
    assert image["scale"] == pytest.approx(64 / 80) and (image["height"], image["width"]) == (80, 50)
    assert 0 < len(image["proposals"]) <= SMALL["rpn"]["post_nms_top_n_test"]
    assert all(0 <= p["box_px"][0] < p["box_px"][2] <= 50 and 0 <= p["box_px"][1] < p["box_px"][3] <= 80 for p in image["proposals"])
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert findings["model"]["class_names"] == ["nodule", "spiculated"]

    # a later run without --proposals keeps the folder as it is, or with --overwrite replaces all of
    # it: an earlier run's proposals must not stay beside new findings as if they were theirs
    with redirect_stdout(io.StringIO()):
        kept = predict_files(ckpt, tmp_path / "in", tmp_path / "out", num_workers=0)
    assert kept.kept == [tmp_path / "out"] and (tmp_path / "out" / "proposals.json").exists()
    with redirect_stdout(io.StringIO()) as printed:
        predict_files(ckpt, tmp_path / "in", tmp_path / "out", num_workers=0, overwrite=True)
    assert not (tmp_path / "out" / "proposals.json").exists() and (tmp_path / "out" / "findings.json").exists()
    assert "removed the earlier run's proposals.json" in printed.getvalue()


def test_proposals_move_to_original_pixels_and_millimetres(tmp_path):
    # rows are 0.7 mm apart, columns 0.4 mm; the network saw the image at half size
    image = ImageFindings(source="a.dcm", height=100, width=60, spacing=(0.7, 0.4), findings=[], frame=2,
                          uids={"SOPInstanceUID": "1.2.3", "Modality": "CT"})
    boxes = torch.tensor([[5.0, 10.0, 15.0, 20.0], [1.0, 2.0, 40.0, 60.0], [31.0, 5.0, 40.0, 9.0]])
    scores = torch.tensor([0.2, 0.9, 0.8])  # the third box lies in the padding right of the image
    item = image_proposals(image, boxes, scores, scale=0.5, input_size=50)
    path = write_proposals(tmp_path / "p.json", [item])
    (written,) = json.loads(path.read_text())["images"]
    assert (written["frame"], written["sop_instance_uid"], written["modality"]) == (2, "1.2.3", "CT")
    assert "findings" not in written and "overlay" not in written
    assert [p["score"] for p in written["proposals"]] == [0.9, 0.2]
    assert [p["box_px"] for p in written["proposals"]] == [[2.0, 4.0, 60.0, 100.0], [10.0, 20.0, 30.0, 40.0]]
    assert written["proposals"][1]["box_mm"] == [4.0, 14.0, 12.0, 28.0]
    assert written["proposals"][1]["size_mm"] == [8.0, 14.0]
