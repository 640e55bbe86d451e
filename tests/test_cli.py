"""End to end through the `medrpn` command, as a user runs it: synth -> fit -> MLflow -> predict.

One short real training run (a few steps on generated DICOM files, one of them broken on
purpose) is shared by the tests of this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image as PILImage

from medrpn.inference.predict import predict_files
from medrpn.data.synth import write_synthetic_dataset
from support import run_medrpn

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    write_synthetic_dataset(work / "data", n_images=24, image_size=128, seed=5)
    broken = sorted((work / "data" / "images").glob("*.dcm"))[0]
    broken.write_bytes(broken.read_bytes()[:300])  # a truncated DICOM file inside the dataset
    result = run_medrpn(
        "fit",
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--data.annotations", str(work / "data" / "annotations.csv"),
        "--data.image_size", "128",
        "--data.batch_size", "4",
        "--data.num_workers", "0",
        "--data.val_fraction", "0.25",
        "--data.test_fraction", "0.25",
        "--model.backbone.fpn_channels", "32",
        "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1",
        "--trainer.logger.init_args.run_name", "e2e",
        cwd=work,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return work, broken, output


def test_fit_reports_the_broken_file_and_finishes(trained):
    work, broken, output = trained
    assert f"Skipping unreadable image {broken}" in output
    assert "medrpn fit finished." in output
    assert "held-out test   FROC sensitivity at 1 FP/image" in output
    assert (work / "demo" / "checkpoints" / "best.ckpt").is_file()


def test_mlflow_store_has_params_metrics_and_artifacts(trained):
    work, _, _ = trained
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
    runs = mlflow.search_runs(experiment_names=["medrpn-demo"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    params, metrics = run.data.params, run.data.metrics
    assert params["model/backbone/name"] == "resnet18"
    assert params["data/image_size"] == "128"
    assert params["trainer/max_epochs"] == "2"
    tags = run.data.tags
    assert len(tags["medrpn.config_sha256"]) == 64 and len(tags["medrpn.dataset_fingerprint"]) == 64
    assert tags["medrpn.git_commit"]
    for loss in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"):
        assert f"train/{loss}_epoch" in metrics
    for key in ("froc_0.125fp", "froc_1fp", "froc_8fp", "cpm", "cpm_iou50", "map50", "rpn_recall100"):
        assert f"val/{key}" in metrics and f"test/{key}" in metrics
    client = mlflow.MlflowClient()
    val_cpm = client.get_metric_history(run.info.run_id, "val/cpm")
    assert len(val_cpm) == 2  # one value per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id, "best")] if "best" in artifacts else []
    assert any(p.endswith(".ckpt") for p in checkpoints), artifacts


def test_checkpoint_loads_without_code_and_knows_its_model(trained):
    work, _, _ = trained
    checkpoint = torch.load(work / "demo" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"] == ["nodule", "spiculated"]
    assert checkpoint["datamodule_hyper_parameters"]["image_size"] == 128


def test_predict_writes_findings_and_overlays_and_skips_bad_files(trained, tmp_path):
    work, broken, _ = trained
    write_synthetic_dataset(tmp_path / "new", n_images=3, image_size=128, seed=77)
    images = tmp_path / "new" / "images"
    PILImage.new("L", (100, 80), color=90).save(images / "plain.png")
    (images / "corrupt.dcm").write_bytes(broken.read_bytes())
    out = tmp_path / "out"
    report = predict_files(work / "demo" / "checkpoints" / "best.ckpt", images, out, score_threshold=0.0)
    assert report.images == 4
    assert [Path(p).name for p, _ in report.skipped] == ["corrupt.dcm"]
    # PNG/JPEG images keep their folder layout (here the top of the output); DICOM goes per study
    plain = json.loads((out / "findings.json").read_text())
    (entry,) = plain["images"]
    assert entry["height"] == 80 and entry["width"] == 100
    assert plain["model"]["score_threshold"] == 0.0
    assert entry["findings"], "at threshold 0 the RoI head's 0.01 floor keeps findings even untrained"
    for finding in entry["findings"]:
        x1, y1, x2, y2 = finding["box_px"]
        assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 80  # back in the original image's pixels
    study = next(out.glob("*/findings.json"))
    dicom_findings = json.loads(study.read_text())
    assert study.parent.name == dicom_findings["study_instance_uid"]
    dicom_entry = dicom_findings["images"][0]
    assert dicom_entry["pixel_spacing_mm"] == [0.5, 0.5]
    assert dicom_entry["sop_instance_uid"]
    assert dicom_entry["findings"]
    assert all(f["box_mm"] is not None for f in dicom_entry["findings"])
    assert (study.parent / "sr.dcm").is_file()
    assert PILImage.open(out / entry["overlay"]).size == (100, 80)


def test_predict_command_line(trained, tmp_path):
    work, _, _ = trained
    write_synthetic_dataset(tmp_path / "new", n_images=1, image_size=128, seed=9)
    image = next((tmp_path / "new" / "images").glob("*.dcm"))
    args = ["predict", "--ckpt", str(work / "demo" / "checkpoints" / "best.ckpt"), "--input", str(image),
            "--output", str(tmp_path / "out"), "--num-workers", "0"]
    result = run_medrpn(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "medrpn predict: 1 images" in result.stdout
    (study,) = (tmp_path / "out").iterdir()
    assert {p.name for p in study.iterdir()} >= {"findings.json", "sr.dcm", image.with_suffix(".png").name}
    again = run_medrpn(*args, cwd=tmp_path)  # an existing output is kept unless --overwrite is given
    assert again.returncode == 0 and "kept existing outputs" in again.stdout
    assert "medrpn predict: 0 images" in again.stdout
    replaced = run_medrpn(*args, "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0 and "medrpn predict: 1 images" in replaced.stdout


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run_medrpn("predict", "--ckpt", "nope.ckpt", "--input", ".", "--output", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.ckpt: checkpoint not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_sync_batchnorm_on_cpu_is_a_clear_error(tmp_path):
    result = run_medrpn(
        "fit", "--config", str(REPO / "configs" / "demo.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.sync_batchnorm", "true", cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "trainer.sync_batchnorm needs GPUs" in result.stderr and "Traceback" not in result.stderr


def test_bf16_on_a_cpu_that_emulates_it_is_warned_of(tmp_path):
    from medrpn.training.cli import cpu_has_bf16

    result = run_medrpn(
        "fit", "--config", str(REPO / "configs" / "demo.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.precision", "bf16-mixed", "--data.annotations", "missing.csv", cwd=tmp_path,
    )
    assert result.returncode == 2 and "missing.csv" in result.stderr  # the run stops at the data, after the check
    assert ("trainer.precision bf16-mixed on a CPU without bf16 instructions" in result.stderr) == (not cpu_has_bf16())


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_parses(config, capsys):
    from medrpn.cli import main as medrpn_main

    with pytest.raises(SystemExit) as done:
        medrpn_main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "annotations:" in printed
