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

from medrpn.synth import write_synthetic_dataset

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
