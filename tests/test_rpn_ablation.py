"""bench/rpn_ablation.py: real `medrpn fit` runs of two variants on a tiny synthetic dataset give a
table with every figure measured, the runs in MLflow; a variant that cannot be built is recorded
as failed while the table is still written."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import mlflow
import pytest
import yaml

from medrpn.data.synth import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SIZE = 96
BATCH = 2
TRAIN_BATCHES = 2


def _load_bench():
    spec = importlib.util.spec_from_file_location("rpn_ablation", REPO / "bench" / "rpn_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _load_bench()


@pytest.fixture(scope="module")
def annotations(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ablation_data")
    write_synthetic_dataset(root / "data", n_images=16, image_size=SIZE, seed=7)
    return root / "data" / "annotations.csv"


def _sets(annotations: Path) -> list[str]:
    sets = {
        "data.annotations": str(annotations),
        "data.image_size": SIZE,
        "data.num_workers": 0,
        "data.batch_size": BATCH,
        "data.val_fraction": 0.25,
        "data.test_fraction": 0.25,
        "model.backbone.fpn_channels": 16,
        "model.bootstrap_samples": 10,
        "trainer.limit_train_batches": TRAIN_BATCHES,
        "trainer.accelerator": "cpu",
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def test_two_variants_are_trained_measured_and_tabled(annotations, tmp_path):
    out = tmp_path / "ablation"
    variants = ["baseline", "anchors_planned_3"]
    ablation.main(
        ["--config", str(REPO / "configs" / "demo.yaml"), "--variants", ",".join(variants), "--epochs", "1",
         "--out", str(out), "--threads", "1", *_sets(annotations)]
    )

    result = json.loads((out / "ablation.json").read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == variants
    for name, row in rows.items():
        assert row["error"] is None, f"{name}: {row['error']}"
        figures = [row[f"val_{m}"] for m in ablation.METRICS] + [
            row["train_images_per_s"], row["infer_images_per_s"]["b1"], row["infer_images_per_s"]["b8"], row["anchor_coverage"]
        ]
        assert all(isinstance(v, float) and math.isfinite(v) for v in figures), (name, figures)
        assert row["train_images_per_s"] > 0 and min(row["infer_images_per_s"].values()) > 0
        assert row["train_images"] == BATCH * TRAIN_BATCHES and row["epochs"] == row["best_epoch"] + 1 == 1
        assert 0.0 <= row["anchor_coverage"] <= 1.0 and row["anchors_per_image"] > 0
        work = out / name
        config = yaml.safe_load((work / "config.yaml").read_text())
        assert all(c["init_args"]["dirpath"] == str(work.resolve()) for c in config["trainer"]["callbacks"]
                   if c["class_path"].endswith("Checkpoint"))
        assert Path(row["checkpoint"]).parent == work.resolve()
    base, planned = rows["baseline"], rows["anchors_planned_3"]
    assert base["anchors"] == {"sizes": [[8], [16], [32], [64]], "aspect_ratios": [0.5, 1.0, 2.0]}  # demo.yaml's
    assert planned["anchors"] != base["anchors"]
    assert all(len(level) * len(planned["anchors"]["aspect_ratios"]) <= 3 for level in planned["anchors"]["sizes"])

    mlflow.set_tracking_uri(result["meta"]["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=[ablation.EXPERIMENT], output_format="list")
    assert sorted(r.info.run_name for r in runs) == sorted(f"ablation-{v}" for v in variants)
    assert {r.info.run_id for r in runs} == {row["run_id"] for row in rows.values()}
    assert all(r.info.status == "FINISHED" for r in runs)

    table = (out / "ablation.md").read_text()
    base_line = next(line for line in table.splitlines() if line.startswith("| baseline |"))
    planned_line = next(line for line in table.splitlines() if line.startswith("| anchors_planned_3 |"))
    assert f"{base['val_cpm']:.3f}" in base_line and f"{base['anchors_per_image']:,}" in base_line
    assert planned_line.rstrip(" |").endswith(f"{planned['val_cpm'] - base['val_cpm']:+.3f}")  # Δ CPM to the baseline


def test_a_variant_that_cannot_be_built_is_recorded_as_failed(annotations, tmp_path):
    recipe = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    for pair in _sets(annotations)[1::2]:
        key, value = pair.split("=", 1)
        ablation.set_dotted(recipe, key, yaml.safe_load(value))
    ablation.set_dotted(recipe, "model.anchors.sizes", [[], [], [32.0], []])  # one level: none left without it
    row = ablation.measure_variant("levels_no_finest", recipe, tmp_path, 1, 1, None)
    assert "one level only" in row["error"] and not (tmp_path / "levels_no_finest" / "fit.log").exists()

    meta = {"recipe": "demo", "epochs": 1, "set": {}, "threads": 1, "machine": "test", "date": "today"}
    ablation.write_results(tmp_path, meta, [row])
    assert "| levels_no_finest |" in (tmp_path / "ablation.md").read_text() and "FAILED" in (tmp_path / "ablation.md").read_text()
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"][0]["error"] == row["error"]


def _merge_rows(out: str, variants: list[str], meta: dict) -> None:
    bench = _load_bench()
    measured = []
    for name in variants:  # one write per variant, as main() does after each
        measured.append({"variant": name, "changed": name, "error": f"{name} failed on purpose"})
        bench.merge_into_results(Path(out), meta, measured)


def test_calls_running_at_once_into_one_folder_end_in_one_table(tmp_path):
    import multiprocessing

    meta = {"recipe": "demo", "epochs": 1, "set": {}, "threads": 1, "machine": "test", "date": "today"}
    groups = [["baseline", "sampler_focal", "anchors_planned_9"], ["objectness_softmax", "levels_no_finest", "nms_0.5"]]
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_merge_rows, args=(str(tmp_path), group, meta)) for group in groups]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [v for v in ablation.VARIANTS if any(v in g for g in groups)]
    table = (tmp_path / "ablation.md").read_text()
    assert all(f"| {v} |" in table for g in groups for v in g)

    other = {**meta, "epochs": 2}  # another protocol: the earlier rows are not comparable and are dropped
    _merge_rows(str(tmp_path), ["baseline"], other)
    assert [r["variant"] for r in json.loads((tmp_path / "ablation.json").read_text())["rows"]] == ["baseline"]


def test_rpn_only_proposal_variants_re_evaluate_the_baseline_weights(annotations, tmp_path):
    out = tmp_path / "ablation"
    ablation.main(
        ["--config", str(REPO / "configs" / "demo.yaml"), "--variants", "baseline,nms_0.5", "--epochs", "1",
         "--out", str(out), "--threads", "1", *_sets(annotations), "--set", "model.rpn_only=true"]
    )
    rows = {row["variant"]: row for row in json.loads((out / "ablation.json").read_text())["rows"]}
    base, nms = rows["baseline"], rows["nms_0.5"]
    assert base["error"] is None and nms["error"] is None, (base["error"], nms["error"])
    assert nms["weights_from"] == "baseline" and nms["checkpoint"] == base["checkpoint"]
    assert (out / "nms_0.5" / "validate.log").exists() and not (out / "nms_0.5" / "fit.log").exists()
    assert nms["train_images_per_s"] == base["train_images_per_s"] and nms["run_id"] != base["run_id"]
    assert all(isinstance(nms[f"val_{m}"], float) for m in ablation.METRICS)
    assert yaml.safe_load((out / "nms_0.5" / "config.yaml").read_text())["model"]["rpn"]["nms_thresh"] == 0.5

    mlflow.set_tracking_uri(f"sqlite:///{out.resolve() / 'mlruns.db'}")
    run = mlflow.get_run(nms["run_id"])
    assert run.info.run_name == "ablation-nms_0.5" and "val/rpn_recall100" in run.data.metrics
    assert run.data.params["model/rpn/nms_thresh"] == "0.5"  # evaluated with the variant's setting, not the baseline's
    assert "re-evaluated" in next(line for line in (out / "ablation.md").read_text().splitlines() if line.startswith("| nms_0.5 |"))

    rpn_only, full = {"model": {"rpn_only": True}}, {"model": {}}
    assert ablation.trains_like_baseline(rpn_only, {"model.rpn.nms_thresh": 0.5})
    assert not ablation.trains_like_baseline(full, {"model.rpn.nms_thresh": 0.5})  # the RoI head trains on proposals
    assert not ablation.trains_like_baseline(rpn_only, {"model.rpn.sampler": "focal"})
    assert not ablation.trains_like_baseline(rpn_only, {})
