"""`medrpn evaluate` and the final evaluation of `medrpn fit`, on a real tiny training run:
the printed table, the run it is recorded in (or a new one), metrics, artifacts, and errors."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from PIL import Image as PILImage

from medrpn.cli import main as medrpn_main
from trained_run import RUN_NAME, TrainedRun, trained_run


@pytest.fixture(scope="module")
def run(request, tmp_path_factory) -> TrainedRun:
    return trained_run(request, tmp_path_factory)


def _client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri)


def _the_run(run: TrainedRun):
    runs = _client(run.tracking_uri).search_runs(
        [e.experiment_id for e in _client(run.tracking_uri).search_experiments()],
        filter_string=f"attributes.run_name = '{RUN_NAME}'",
    )
    assert len(runs) == 1
    return runs[0]


def test_fit_logs_every_figure_per_epoch_and_a_final_evaluation(run):
    mlflow_run = _the_run(run)
    metrics = mlflow_run.data.metrics
    for key in ("froc_0.125fp", "froc_1fp", "froc_8fp", "cpm", "map10", "map50", "map50_95",
                "rpn_recall10", "rpn_recall1000", "rpn_ar100", "op_score_threshold", "op_fp_per_image"):
        assert f"val/{key}" in metrics and f"test/{key}" in metrics, key
    assert "val/nodule/cpm" in metrics and "test/spiculated/map50" in metrics  # per class
    # the final evaluation adds bootstrap intervals around its points
    for key in ("froc_1fp", "cpm"):
        low, value, high = (metrics[f"test/{key}{s}"] for s in ("_ci_low", "", "_ci_high"))
        assert low <= value + 1e-9 and value <= high + 1e-9
    assert "val/cpm_ci_low" not in metrics  # not every epoch: they cost a bootstrap
    client = _client(run.tracking_uri)
    files = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "evaluation/test")}
    assert {f"evaluation/test/{n}" for n in ("froc.png", "precision_recall.png", "proposal_recall.png", "metrics.txt", "report.json")} <= files
    # the checkpoint knows its run, for `medrpn evaluate`
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["mlflow_run"]["run_id"] == mlflow_run.info.run_id
    assert checkpoint["mlflow_run"]["tracking_uri"].startswith("sqlite:////")  # absolute


def test_evaluate_prints_the_table_and_records_it_in_the_checkpoint_run(run, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the run's folder: the run is found through the checkpoint
    medrpn_main(["evaluate", "--ckpt", str(run.ckpt), "--config", str(run.config), "--split", "val"])
    out = capsys.readouterr().out
    assert "FROC sensitivity (bootstrap 95% interval over 200 patient resamples)" in out
    for line in ("FP per image     0.125    0.25     0.5       1       2       4       8     CPM",
                 "mAP              IoU 0.1   IoU 0.5  0.5:0.95",
                 "RPN proposal recall at IoU 0.5 (lesion size in mm",
                 "Operating point: score >= "):
        assert line in out
    mlflow_run = _the_run(run)
    assert f"Recorded in the checkpoint's run {mlflow_run.info.run_id}" in out
    metrics = mlflow_run.data.metrics
    for key in ("cpm", "cpm_ci_low", "cpm_ci_high", "froc_1fp", "map10", "map50", "map50_95",
                "rpn_recall100", "rpn_ar100_medium", "op_fp_per_image"):
        assert f"eval/val/{key}" in metrics, key
    # evaluated on the split it was picked on, the stored operating point gives its own FP rate
    stored = torch.load(run.ckpt, map_location="cpu", weights_only=True)["operating_point"]
    assert metrics["eval/val/op_fp_per_image"] == pytest.approx(stored["fp_per_image"])
    assert metrics["eval/val/op_score_threshold"] == pytest.approx(stored["score_threshold"])
    # ... and the same figures as the validation epoch that chose the checkpoint
    assert metrics["eval/val/cpm"] == pytest.approx(metrics["val/cpm"])
    assert metrics["eval/val/map50"] == pytest.approx(metrics["val/map50"])
    client = _client(run.tracking_uri)
    local = client.download_artifacts(mlflow_run.info.run_id, "evaluation/val", str(tmp_path / "dl"))
    with PILImage.open(f"{local}/froc.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    assert "Operating point" in open(f"{local}/metrics.txt").read()


def test_evaluate_without_a_known_run_makes_a_new_one(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    checkpoint.pop("mlflow_run")
    orphan = tmp_path / "orphan.ckpt"
    torch.save(checkpoint, orphan)
    medrpn_main(["evaluate", "--ckpt", str(orphan), "--config", str(run.config), "--tracking-uri", run.tracking_uri])
    out = capsys.readouterr().out
    assert "Recorded in a new run" in out
    client = _client(run.tracking_uri)
    experiment = client.get_experiment_by_name("medrpn-evaluate")
    (new,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'evaluate orphan.ckpt'")
    assert not math.isnan(new.data.metrics["eval/test/map50_95"])
    assert new.data.tags["medrpn.checkpoint"] == str(orphan.resolve())
    assert new.info.status == "FINISHED"
    # the new experiment keeps its files beside the store, not in the working folder
    assert experiment.artifact_location == (run.work / "mlruns").as_uri()
    assert not (tmp_path / "mlruns").exists()
    assert {a.path for a in client.list_artifacts(new.info.run_id, "evaluation/test")} >= {"evaluation/test/froc.png"}


def test_evaluate_errors_name_the_file(run, tmp_path, capsys):
    for args, message in (
        (["--ckpt", str(tmp_path / "nope.ckpt"), "--config", str(run.config)], f"medrpn: error: {tmp_path / 'nope.ckpt'}: checkpoint not found"),
        (["--ckpt", str(run.ckpt), "--config", str(tmp_path / "missing.yaml")], f"File does not exist: '{tmp_path / 'missing.yaml'}'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            medrpn_main(["evaluate", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_evaluate_uses_the_data_the_checkpoint_was_trained_on_unless_told(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # no config: the checkpoint's data settings, so the validation figures of the fit again
    medrpn_main(["evaluate", "--ckpt", str(run.ckpt), "--split", "val", "--trainer.max_epochs", "7"])
    out = capsys.readouterr().out
    assert "as given" not in out
    metrics = _the_run(run).data.metrics
    assert metrics["eval/val/cpm"] == pytest.approx(metrics["val/cpm"])
    # an override reaches the data module, and the difference is said
    medrpn_main(["evaluate", "--ckpt", str(run.ckpt), "--config", str(run.config), "--split", "val",
                 "--data.val_fraction", "0.5"])
    out = capsys.readouterr().out
    assert "data.val_fraction: 0.5 as given (the checkpoint was trained with 0.25)" in out
    images = int(out.split("medrpn evaluate:")[1].split(" images (")[0].split()[-1])
    assert images > 4  # the fit's validation split holds 4 of the 16 images
