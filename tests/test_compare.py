"""`medrpn compare`: runs found by id or name in the MLflow store, printed side by side, and their
FROC curves in one PNG. One run is a real tiny `medrpn fit`; the others are logged here through
MLflow's client, as another training recipe would have logged them."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from PIL import Image as PILImage

from medrpn.cli import main as medrpn_main
from trained_run import RUN_NAME, TrainedRun, trained_run

OTHER_FROC = [0.31, 0.42, 0.55, 0.66, 0.74, 0.81, 0.86]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> tuple[TrainedRun, str]:
    """The trained run, plus a run "mobilenet-recipe" with test figures and intervals."""
    run = trained_run(request, tmp_path_factory)
    client = mlflow.MlflowClient(tracking_uri=run.tracking_uri)
    experiment = client.get_experiment_by_name("medrpn-demo").experiment_id
    other = client.create_run(experiment, run_name="mobilenet-recipe").info.run_id
    client.log_param(other, "model/backbone/name", "mobilenet_v3_large")
    client.log_param(other, "data/image_size", "128")
    for rate, value in zip(("0.125", "0.25", "0.5", "1", "2", "4", "8"), OTHER_FROC):
        client.log_metric(other, f"test/froc_{rate}fp", value)
        client.log_metric(other, f"test/froc_{rate}fp_ci_low", value - 0.05)
        client.log_metric(other, f"test/froc_{rate}fp_ci_high", value + 0.05)
    client.log_metric(other, "test/cpm", float(np.mean(OTHER_FROC)))
    client.log_metric(other, "test/map50", 0.4)
    client.set_terminated(other)
    return run, other


def test_compare_by_name_and_id_prints_runs_side_by_side_and_plots(runs, tmp_path, capsys):
    run, other = runs
    fitted = mlflow.MlflowClient(tracking_uri=run.tracking_uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=run.tracking_uri).get_experiment_by_name("medrpn-demo").experiment_id],
        filter_string=f"attributes.run_name = '{RUN_NAME}'",
    )[0]
    out_png = tmp_path / "froc.png"
    medrpn_main(["compare", RUN_NAME, other, "--tracking-uri", run.tracking_uri, "--output", str(out_png)])
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert f"{RUN_NAME} [{fitted.info.run_id[:8]}]" in header and f"mobilenet-recipe [{other[:8]}]" in header
    table = {line.split()[0]: line.split()[1:] for line in rows if line.strip() and not line.startswith("FROC")}
    assert table["stage"] == ["test", "test"]
    assert table["model/backbone/name"] == ["resnet18", "mobilenet_v3_large"]
    assert table["cpm"][1] == f"{np.mean(OTHER_FROC):.4g}"
    assert float(table["cpm"][0]) == pytest.approx(fitted.data.metrics["test/cpm"], abs=1e-3)
    assert table["froc_1fp"][1] == "0.66"
    assert "map50_95" in table and table["map50_95"][1] == "-"  # logged by one run only
    assert "trainer/max_epochs" in table  # a differing (or key) setting
    assert f"FROC curves of 2 run(s) written to {out_png.resolve()}" in out
    with PILImage.open(out_png) as image:
        assert image.size[0] > 300
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # curves drawn, not a blank canvas


def test_compare_reports_unknown_runs_and_stores(runs, tmp_path, capsys):
    run, _ = runs
    with pytest.raises(SystemExit) as exit_info:
        medrpn_main(["compare", "no-such-run", "--tracking-uri", run.tracking_uri, "--output", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "no-such-run: no run with this id or name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        medrpn_main(["compare", RUN_NAME, "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    assert "none.db: no MLflow store here" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()  # no empty store left behind


def test_a_name_used_twice_means_the_newest_run(runs, tmp_path, capsys):
    run, _ = runs
    client = mlflow.MlflowClient(tracking_uri=run.tracking_uri)
    experiment = client.get_experiment_by_name("medrpn-demo").experiment_id
    older = client.create_run(experiment, run_name="twice", start_time=1_000).info.run_id
    newer = client.create_run(experiment, run_name="twice", start_time=2_000).info.run_id
    client.log_metric(older, "val/cpm", 0.1)
    client.log_metric(newer, "val/cpm", 0.2)
    medrpn_main(["compare", "twice", "--tracking-uri", run.tracking_uri, "--output", str(tmp_path / "x.png")])
    out = capsys.readouterr().out
    assert f"2 runs are named 'twice'; using the newest, {newer}" in out
    assert "val" in out.splitlines()[2] and "0.2" in out
