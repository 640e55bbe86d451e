"""The decoupled second stage (`medrpn.second_stage`): crop geometry, candidate labelling, the
classifier learning, re-scoring modes, and `medrpn fit-crops` -> `evaluate/predict --second-stage`
end to end on the tiny trained run shared with the evaluation tests."""

from __future__ import annotations

import json
import math
import re

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from medrpn.cli import main as medrpn_main
from medrpn.errors import MedrpnError
from medrpn.metrics.froc import FP_RATES
from medrpn.model.detector import DetectorOutput
from medrpn.inference.predict import predict_files
from medrpn.second_stage import (
    CropClassifier,
    CropClassifierConfig,
    SecondStage,
    SecondStageSettings,
    context_boxes,
    crop_patches,
    load_second_stage,
    save_second_stage,
)
from medrpn.second_stage.candidates import IGNORE, label_candidates, select_candidates
from medrpn.second_stage.training import CropClassifierModule, balanced_class_weights
from trained_run import TrainedRun, trained_run

CLASSES = ["nodule", "spiculated"]




def _ramp(height: int = 96, width: int = 96) -> torch.Tensor:
    """An image whose pixel (r, c) holds 1000 r + c (bilinear sampling of it is exact)."""
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    return (1000 * rows + cols)[None, None]


# ---------------------------------------------------------------------------------------------
# crops


def test_the_crop_centre_is_the_image_pixel_at_the_box_centre():
    image = _ramp()
    r, c = 40, 30
    box = torch.tensor([[c - 5.0, r - 3.0, c + 6.0, r + 4.0]])  # centre (c + 0.5, r + 0.5): pixel (r, c)
    odd = crop_patches(image, [box], crop_size=33)[0, 0]
    assert odd[16, 16].item() == pytest.approx(image[0, 0, r, c].item(), abs=1e-6)
    even = crop_patches(image, [box], crop_size=48)[0, 0]
    assert even[23:25, 23:25].mean().item() == pytest.approx(image[0, 0, r, c].item(), abs=1e-6)
    # a window of exactly crop_size pixels on the pixel grid is that part of the image, unchanged
    pixels = torch.rand(2, 3, 64, 64)
    exact = torch.tensor([[10.0, 20.0, 42.0, 52.0]])
    crops = crop_patches(pixels, [torch.zeros(0, 4), exact], crop_size=32, margin=0.0, min_side=0.0)
    assert crops.shape == (1, 3, 32, 32)
    assert torch.equal(crops[0], pixels[1, :, 20:52, 10:42])


@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0])
def test_the_margin_scales_the_window_side(margin):
    box = torch.tensor([[30.0, 40.0, 50.0, 50.0]])  # 20 x 10: the longest side counts
    window = context_boxes(box, margin, min_side=0.0)[0]
    side = 20 * (1 + 2 * margin)
    assert window.tolist() == pytest.approx([40 - side / 2, 45 - side / 2, 40 + side / 2, 45 + side / 2])
    size = 32
    crop = crop_patches(_ramp(), [box], crop_size=size, margin=margin, min_side=0.0)[0, 0]
    # the ramp rises by 1 per pixel along a row: the span sampled is the window's side
    assert ((crop[0, -1] - crop[0, 0]) * size / (size - 1)).item() == pytest.approx(side, rel=1e-5)
    assert ((crop[-1, 0] - crop[0, 0]) * size / (size - 1)).item() == pytest.approx(1000 * side, rel=1e-5)
    tiny = context_boxes(torch.tensor([[10.0, 10.0, 12.0, 13.0]]), margin, min_side=16.0)[0]
    assert (tiny[2] - tiny[0]).item() == pytest.approx(16.0) and (tiny[3] - tiny[1]).item() == pytest.approx(16.0)


# ---------------------------------------------------------------------------------------------
# candidates


def test_candidates_are_labelled_by_their_overlap_with_the_lesions():
    gt_boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [60.0, 60.0, 80.0, 80.0]])
    gt_labels = torch.tensor([1, 0])
    candidates = torch.tensor([
        [10.0, 10.0, 30.0, 30.0],  # the first lesion: class 1 -> label 2
        [61.0, 60.0, 81.0, 80.0],  # IoU 0.905 with the second: class 0 -> label 1
        [10.0, 10.0, 30.0, 20.0],  # IoU 0.5 exactly: positive
        [10.0, 10.0, 20.0, 26.0],  # IoU 0.4: neither
        [10.0, 10.0, 30.0, 15.0],  # IoU 0.25: background
        [40.0, 40.0, 50.0, 50.0],  # touches nothing: background
    ])
    assert label_candidates(candidates, gt_boxes, gt_labels).tolist() == [2, 1, 2, IGNORE, 0, 0]
    assert label_candidates(candidates, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).tolist() == [0] * 6


def test_candidates_come_from_detections_or_proposals_above_the_minimum_score():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [5.0, 5.0, 9.0, 9.0]])
    output = DetectorOutput(
        detections=[{"boxes": boxes[:2], "scores": torch.tensor([0.9, 0.02]), "labels": torch.tensor([1, 0])}],
        proposals=[boxes],
        proposal_scores=[torch.tensor([0.8, 0.5, 0.01])],
    )
    detections = select_candidates(output, "detections", 0.05)[0]
    assert detections["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0]] and detections["labels"].tolist() == [1]
    proposals = select_candidates(output, "proposals", 0.05)[0]
    assert proposals["scores"].tolist() == pytest.approx([0.8, 0.5]) and proposals["labels"].tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------
# the classifier and its training


def _shapes(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (background), a bright disc (class 0) or a bright ring (class 1) at the centre, with
    random radius, brightness and noise."""
    yy, xx = torch.meshgrid(torch.arange(size) - size / 2 + 0.5, torch.arange(size) - size / 2 + 0.5, indexing="ij")
    distance = (yy**2 + xx**2).sqrt()
    labels = torch.arange(n) % 3
    radius = size / 8 + torch.rand(n, generator=generator) * size / 8
    disc = (distance[None] < radius[:, None, None]).float()
    ring = ((distance[None] - radius[:, None, None]).abs() < 1.5).float()
    shape = torch.where((labels == 1)[:, None, None], disc, torch.where((labels == 2)[:, None, None], ring, 0.0))
    brightness = 0.3 + 0.3 * torch.rand(n, 1, 1, generator=generator)
    crops = 0.3 + brightness * shape + 0.08 * torch.randn(n, size, size, generator=generator)
    return crops[:, None].clamp(0, 1), labels


def test_the_classifier_learns_crops_and_its_loss_falls():
    generator = torch.Generator().manual_seed(0)
    crops, labels = _shapes(96, 32, generator)
    L.seed_everything(0, verbose=False)
    module = CropClassifierModule(CropClassifierConfig(num_classes=2), class_weights=balanced_class_weights([32, 32, 32]), lr=3e-3)
    module.eval()
    with torch.no_grad():
        before = module.loss(crops, labels).item()
    trainer = L.Trainer(max_epochs=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(TensorDataset(crops, labels), batch_size=32, shuffle=True))
    module.eval()
    with torch.no_grad():
        after = module.loss(crops, labels).item()
        new_crops, new_labels = _shapes(60, 32, generator)
        accuracy = (module.classifier(new_crops).argmax(1) == new_labels).float().mean().item()
    assert after < 0.3 * before, (before, after)
    assert accuracy > 0.9  # on crops it has not seen: it learnt the shapes, not the batch


def test_balanced_class_weights_equalise_the_classes():
    weights = balanced_class_weights([90, 10, 0])
    assert weights[0] * 90 == pytest.approx(weights[1] * 10) and weights[2] == 0.0


# ---------------------------------------------------------------------------------------------
# re-scoring


def _constant_stage(probabilities: list[float], **settings) -> SecondStage:
    """A second stage whose classifier says ``probabilities`` (background first) for every crop."""
    classifier = CropClassifier(CropClassifierConfig(num_classes=2, widths=[4]))
    final = classifier.head[-1]
    torch.nn.init.zeros_(final.weight)
    final.bias.data = torch.tensor(probabilities).log()
    return SecondStage(classifier, SecondStageSettings(**settings), CLASSES).eval()


def _output() -> tuple[torch.Tensor, DetectorOutput]:
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [11.0, 10.0, 31.0, 30.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 4.0, 4.0]])
    output = DetectorOutput(
        detections=[{"boxes": boxes, "scores": torch.tensor([0.64, 0.36, 0.16, 0.005]), "labels": torch.tensor([1, 1, 1, 1])}],
        proposals=[boxes],
        proposal_scores=[torch.tensor([0.9, 0.8, 0.7, 0.6])],
    )
    return torch.rand(1, 1, 64, 64), output


def test_rescore_relabel_and_both():
    images, output = _output()
    probabilities = [0.36, 0.6, 0.04]  # lesion 0.64, most likely nodule (class 0)
    rescored = _constant_stage(probabilities, mode="rescore", combine="none")(images, output)[0]
    assert rescored["scores"].tolist() == pytest.approx([0.64] * 3)  # the 0.005 candidate is below min_score
    assert rescored["labels"].tolist() == [1, 1, 1]
    geometric = _constant_stage(probabilities, mode="rescore", combine="geometric")(images, output)[0]
    assert geometric["scores"].tolist() == pytest.approx([0.64, 0.48, 0.32])  # sqrt(0.64 x detector score)
    relabelled = _constant_stage(probabilities, mode="relabel")(images, output)[0]
    assert relabelled["scores"].tolist() == pytest.approx([0.64, 0.36, 0.16]) and relabelled["labels"].tolist() == [0, 0, 0]
    both = _constant_stage(probabilities, mode="both", combine="none")(images, output)[0]
    assert both["scores"].tolist() == pytest.approx([0.64] * 3) and both["labels"].tolist() == [0, 0, 0]


def test_proposals_are_labelled_by_the_classifier_and_thinned_by_nms():
    images, output = _output()
    stage = _constant_stage([0.19, 0.01, 0.8], mode="rescore", candidates="proposals", combine="geometric")
    result = stage(images, output)[0]
    # the second proposal overlaps the first (IoU 0.9) and goes; every label is the classifier's
    assert result["boxes"].tolist() == [[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 4.0, 4.0]]
    assert result["scores"].tolist() == pytest.approx([math.sqrt(0.81 * s) for s in (0.9, 0.7, 0.6)])
    assert result["labels"].tolist() == [1, 1, 1]


def test_a_saved_second_stage_loads_with_weights_only_and_gives_the_same_output(tmp_path):
    images, output = _output()
    torch.manual_seed(0)
    stage = SecondStage(
        CropClassifier(CropClassifierConfig(num_classes=2)), SecondStageSettings(mode="both", crop_size=32), CLASSES,
        operating_point={"score_threshold": 0.4, "fp_per_image": 1.0, "sensitivity": 0.5, "target_fp_per_image": 1.0},
    ).eval()
    path = save_second_stage(stage, tmp_path / "crops.ckpt")
    plain = torch.load(path, map_location="cpu", weights_only=True)
    assert plain["settings"]["crop_size"] == 32 and plain["class_names"] == CLASSES
    loaded = load_second_stage(path)
    assert loaded.operating_point["score_threshold"] == 0.4
    for a, b in zip(stage(images, output), loaded(images, output)):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "detector.ckpt")
    with pytest.raises(MedrpnError, match="not a second-stage checkpoint"):
        load_second_stage(tmp_path / "detector.ckpt")


# ---------------------------------------------------------------------------------------------
# medrpn fit-crops, evaluate and predict --second-stage, end to end


@pytest.fixture(scope="module")
def run(request, tmp_path_factory) -> TrainedRun:
    return trained_run(request, tmp_path_factory)


@pytest.fixture(scope="module")
def fitted(run, tmp_path_factory) -> tuple[str, str]:
    """A second stage fitted on the run's detector: (checkpoint path, what fit-crops printed)."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("second_stage") / "crops.ckpt"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the untrained detector finds little: its proposals give crops
        medrpn_main(["fit-crops", "--ckpt", str(run.ckpt), "--config", str(run.config), "--output", str(path),
                     "--epochs", "2", "--candidates", "proposals", "--crop-size", "32"])
    return str(path), out.getvalue()


def _rows(text: str, title: str) -> list[float]:
    line = next(line for line in text.splitlines() if line.startswith(title))
    return [float(v) for v in re.findall(r"\d\.\d{3}", line)]


def test_fit_crops_writes_a_plain_checkpoint_and_prints_both_rows(fitted, run):
    path, out = fitted
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["format"] == "medrpn-second-stage"
    assert checkpoint["settings"]["candidates"] == "proposals" and checkpoint["settings"]["crop_size"] == 32
    assert checkpoint["class_names"] == CLASSES
    assert checkpoint["detector"]["checkpoint"] == str(run.ckpt.resolve())
    counts = checkpoint["training"]["train_counts"]
    assert counts[0] > 0 and counts[1] > 0 and counts[2] > 0  # background from proposals, lesions at least from the truth
    assert "training crops per label  background" in out
    for title in ("all: detector alone", "all: + second stage"):  # FROC, CPM and the CPM at IoU 0.5
        assert len(_rows(out, title)) == len(FP_RATES) + 2, title
    for title in ("nodule: + second stage", "spiculated: detector alone"):
        assert len(_rows(out, title)) == len(FP_RATES) + 1, title
    assert _rows(out, "all: + second stage")[-2] == pytest.approx(checkpoint["validation"]["second_stage"]["cpm"], abs=1e-3)


def test_fit_crops_is_an_mlflow_run_beside_the_detectors(fitted, run):
    import mlflow

    path, out = fitted
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    client = mlflow.MlflowClient(tracking_uri=run.tracking_uri)  # the detector's store: it names no other
    (crop_run,) = client.search_runs([client.get_experiment_by_name("medrpn-second-stage").experiment_id])
    run_id = crop_run.info.run_id
    assert checkpoint["mlflow_run"]["run_id"] == run_id and f"MLflow run {run_id}" in out
    detector_run = torch.load(run.ckpt, map_location="cpu", weights_only=True)["mlflow_run"]["run_id"]
    assert crop_run.data.tags["medrpn.detector_run"] == detector_run
    assert crop_run.data.params["candidates"] == "proposals" and crop_run.data.params["epochs"] == "2"
    metrics = crop_run.data.metrics
    for name in ("detector", "second_stage"):
        assert metrics[f"val/{name}/cpm"] == pytest.approx(checkpoint["validation"][name]["cpm"])
    assert len(client.get_metric_history(run_id, "train/loss")) == 2 and "val/accuracy" in metrics  # per epoch
    artifacts = {a.path for a in client.list_artifacts(run_id, "second_stage")}
    assert artifacts == {"second_stage/crops.ckpt", "second_stage/validation.txt"}


def test_fit_crops_explains_when_there_is_nothing_to_learn_from(run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        medrpn_main(["fit-crops", "--ckpt", str(run.ckpt), "--config", str(run.config),
                     "--output", str(tmp_path / "c.ckpt"), "--min-score", "1.0"])
    assert re.search("no background candidates.*--candidates proposals", capsys.readouterr().err)
    assert not (tmp_path / "c.ckpt").exists()


def test_evaluate_with_a_second_stage_prints_the_detector_alone_and_with_it(fitted, run, tmp_path, capsys):
    path, _ = fitted
    uri = f"sqlite:///{tmp_path / 'eval.db'}"  # a store of its own: the shared run stays as it was
    medrpn_main(["evaluate", "--ckpt", str(run.ckpt), "--config", str(run.config), "--split", "val",
                 "--tracking-uri", uri, "--second-stage", path])
    out = capsys.readouterr().out
    assert "(both proposals), same val images" in out
    alone, with_stage = _rows(out, "all: detector alone"), _rows(out, "all: + second stage")
    assert len(alone) == len(with_stage) == len(FP_RATES) + 2  # FROC, CPM, CPM at IoU 0.5
    # the "alone" row is the detector's own figure in the full table above it
    table_cpm = float(out.split("FP per image")[1].splitlines()[1].split()[-1])
    assert alone[-2] == pytest.approx(table_cpm, abs=1e-3)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    (recorded,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert recorded.data.metrics["eval/val/second_stage/cpm"] == pytest.approx(with_stage[-1], abs=1e-3)
    # a detector checkpoint is not a second stage
    with pytest.raises(SystemExit):
        medrpn_main(["evaluate", "--ckpt", str(run.ckpt), "--config", str(run.config), "--second-stage", str(run.ckpt)])
    assert "not a second-stage checkpoint" in capsys.readouterr().err


def test_evaluate_with_a_second_stage_runs_the_detector_once_for_the_same_figures(fitted, run):
    from medrpn.commands.evaluate import evaluate_checkpoint
    from medrpn.model.detector import LesionDetector

    calls = []

    def count(module, inputs, output):
        if isinstance(module, LesionDetector):
            calls.append(len(inputs[0]))

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        data = torch.load(run.ckpt, map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]
        plain = evaluate_checkpoint(run.ckpt, data, split="val")
        plain_images = sum(calls)
        both = evaluate_checkpoint(run.ckpt, data, split="val", second_stage=fitted[0])
    finally:
        hook.remove()
    assert plain_images > 0 and sum(calls) == 2 * plain_images  # once each, not once more for the second stage
    assert both.second_stage.alone is both.report
    # the single pass reports the detector as Lightning's test loop does: operating point included
    assert both.report.scalars.keys() == plain.report.scalars.keys() and "op_sensitivity" in plain.report.scalars
    for key, value in plain.report.scalars.items():
        assert both.report.scalars[key] == pytest.approx(value, nan_ok=True), key


def test_predict_with_a_second_stage_uses_its_operating_point(fitted, run, tmp_path):
    path, _ = fitted
    image = sorted((run.annotations.parent / "images").glob("*.dcm"))[0]
    report = predict_files(run.ckpt, image, tmp_path / "out", num_workers=0, second_stage=path)
    stored = torch.load(path, map_location="cpu", weights_only=True)["operating_point"]
    assert report.threshold_source == "second-stage operating point"
    assert report.score_threshold == pytest.approx(stored["score_threshold"])
    findings = json.loads(next((tmp_path / "out").rglob("findings.json")).read_text())
    assert findings["model"]["threshold_source"] == "second-stage operating point"
    kept = [f["score"] for i in findings["images"] for f in i["findings"]]
    # the same image at threshold 0: the findings above are exactly those scoring at least the
    # operating point (scores are written with 4 decimals: a score within rounding of the threshold
    # may fall on either side of it)
    predict_files(run.ckpt, image, tmp_path / "all", num_workers=0, second_stage=path, score_threshold=0.0)
    everything = json.loads(next((tmp_path / "all").rglob("findings.json")).read_text())
    scores = [f["score"] for i in everything["images"] for f in i["findings"]]
    assert scores, "at threshold 0 the second stage scores every candidate"
    threshold = stored["score_threshold"]
    clear = [v for v in scores if abs(v - threshold) > 5e-5]
    assert sorted(v for v in kept if abs(v - threshold) > 5e-5) == sorted(v for v in clear if v > threshold)
    assert all(v in scores for v in kept)


def test_an_rpn_only_detector_gets_a_second_stage_for_the_data_classes(run, tmp_path, capsys):
    import lightning

    from medrpn.training.lightning_module import LesionDetectionModule

    torch.manual_seed(0)  # an untrained RPN-only detector, saved as Lightning saves one
    module = LesionDetectionModule(class_names=CLASSES, rpn_only=True, backbone={"fpn_channels": 16},
                                   rpn={"post_nms_top_n_test": 50})
    data_settings = torch.load(run.ckpt, map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]
    detector = tmp_path / "rpn_only.ckpt"
    torch.save({"pytorch-lightning_version": lightning.__version__, "state_dict": module.state_dict(),
                "hyper_parameters": dict(module.hparams), "datamodule_hyper_parameters": data_settings}, detector)
    crops = tmp_path / "crops.ckpt"
    medrpn_main(["fit-crops", "--ckpt", str(detector), "--config", str(run.config), "--output", str(crops),
                 "--epochs", "1", "--crop-size", "32", "--tracking-uri", f"sqlite:///{tmp_path / 'crops.db'}"])
    out = capsys.readouterr().out
    assert "detections are its proposals: using --candidates proposals" in out
    checkpoint = torch.load(crops, map_location="cpu", weights_only=True)
    assert checkpoint["class_names"] == CLASSES and checkpoint["settings"]["candidates"] == "proposals"
    # alone, the detector reports its one class: per class only the second stage has figures
    assert re.search(r"nodule: detector alone\s+n/a", out) and len(_rows(out, "nodule: + second stage")) == len(FP_RATES) + 1
