"""`medrpn export`: the trained detector as ONNX, run by ONNX Runtime alone and by `medrpn predict`,
giving the findings the checkpoint gives (tolerance: `medrpn.inference.onnx_export.PARITY`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from trained_run import TrainedRun, medrpn, trained_run

from medrpn.data.synth import write_synthetic_dataset

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory) -> TrainedRun:
    return trained_run(request, tmp_path_factory)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "detector.onnx"
    result = medrpn("export", "--ckpt", str(trained.ckpt), "--output", str(path), cwd=trained.work)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"{path} written" in result.stdout and "differs from the checkpoint by at most" in result.stdout
    return path


def test_predict_on_the_exported_model_gives_the_checkpoints_findings(trained, exported, tmp_path):
    from medrpn.inference.predict import predict_files

    write_synthetic_dataset(tmp_path / "data", n_images=6, image_size=160, seed=8)
    images = tmp_path / "data" / "images"
    torch_run = predict_files(trained.ckpt, images, tmp_path / "torch", score_threshold=0.05, num_workers=0)
    onnx_run = predict_files(exported, images, tmp_path / "onnx", score_threshold=0.05, num_workers=0)
    assert torch_run.findings > 0 and onnx_run.images == torch_run.images == 6
    assert onnx_run.findings == torch_run.findings
    for folder in torch_run.studies:
        mine = json.loads((tmp_path / "onnx" / folder.name / "findings.json").read_text())
        theirs = json.loads((folder / "findings.json").read_text())
        for a, b in zip(mine["images"], theirs["images"], strict=True):
            assert [f["label"] for f in a["findings"]] == [f["label"] for f in b["findings"]]
            assert [f["tracking_uid"] for f in a["findings"]] == [f["tracking_uid"] for f in b["findings"]]
            for fa, fb in zip(a["findings"], b["findings"]):
                assert fa["score"] == pytest.approx(fb["score"], abs=1e-4)
                assert fa["box_px"] == pytest.approx(fb["box_px"], abs=0.02)
        assert mine["model"]["checkpoint_sha256"] == theirs["model"]["checkpoint_sha256"]  # same SR/GSPS UIDs
        if theirs["dicom"]["sr"]:
            import pydicom

            sr_a, sr_b = (pydicom.dcmread(root / folder.name / "sr.dcm") for root in (tmp_path / "onnx", tmp_path / "torch"))
            assert sr_a.SOPInstanceUID == sr_b.SOPInstanceUID


def test_the_exported_model_runs_with_onnx_runtime_alone(trained, exported):
    """No medrpn, no torch: the metadata says how to feed the graph and what it returns."""
    script = f"""
import json, sys
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession({str(exported)!r}, providers=["CPUExecutionProvider"])
meta = json.loads(session.get_modelmeta().custom_metadata_map["medrpn"])
n, c = meta["image_size"], meta["input_channels"]
image = np.zeros((1, c, n, n), dtype=np.float32)
image[..., n // 4 : n // 2, n // 4 : n // 2] = 0.9
boxes, scores, labels, proposals, proposal_scores = session.run(None, {{"images": image}})
assert not any(m.split(".")[0] in ("torch", "medrpn") for m in sys.modules)
print(json.dumps({{"classes": meta["class_names"], "boxes": boxes.shape, "labels": sorted(set(labels.tolist())),
                   "proposals": proposals.shape, "sorted": bool((np.diff(scores) <= 0).all()),
                   "preprocessing": meta["preprocessing"], "threshold": (meta["operating_point"] or {{}}).get("score_threshold")}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert found["classes"] == ["nodule", "spiculated"] and found["proposals"][1] == 4 and found["boxes"][1] == 4
    assert set(found["labels"]) <= {0, 1} and found["sorted"] and "pad with zeros" in found["preprocessing"]
    assert found["threshold"] is not None


def test_export_refuses_what_it_cannot_export_and_predict_names_a_wrong_file(trained, tmp_path):
    not_onnx = medrpn("export", "--ckpt", str(trained.ckpt), "--output", str(tmp_path / "model.pt"), cwd=trained.work)
    assert not_onnx.returncode == 2 and "name it *.onnx" in not_onnx.stderr
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    from medrpn.errors import ConfigError
    from medrpn.inference.predict import predict_files

    with pytest.raises(ConfigError, match="not an ONNX model ONNX Runtime can load"):
        predict_files(bogus, tmp_path, tmp_path / "out")


@pytest.mark.parametrize("roi", [{"iou_aware": 0.5}, {"image_context": True}], ids=["iou_aware", "image_context"])
def test_a_checkpoint_whose_second_stage_has_more_parts_exports_with_the_same_detections(roi, tmp_path):
    """IoU-aware scores (a third output and its score arithmetic) and the image's context (the
    RoIs' place and their image's mean feature, gathered per RoI): the checkpoint rebuilds them,
    and the traced graph gives PyTorch's detections (export refuses one that differs by more than
    its tolerance)."""
    import torch

    from medrpn.inference.onnx_export import export_onnx
    from medrpn.training.lightning_module import LesionDetectionModule, module_from_checkpoint

    torch.manual_seed(0)
    module = LesionDetectionModule(
        class_names=["a", "b"],
        backbone={"name": "resnet18", "fpn_channels": 16},
        rpn={"pre_nms_top_n_test": 100, "post_nms_top_n_test": 50},
        roi={"detections_per_img": 5, **roi},
    )
    ckpt = tmp_path / "detector.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "datamodule_hyper_parameters": {"image_size": 128}},
        ckpt,
    )
    loaded = module_from_checkpoint(ckpt).model.roi_heads
    assert type(loaded.box_roi_pool) is type(module.model.roi_heads.box_roi_pool)
    assert type(loaded.box_predictor) is type(module.model.roi_heads.box_predictor) and loaded.iou_alpha == roi.get("iou_aware")
    report = export_onnx(ckpt, tmp_path / "detector.onnx")
    assert report.path.exists() and report.detections_compared > 0
