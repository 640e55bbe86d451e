"""Anchor planning: the real-grid best IoU, plans for known box distributions, and `medrpn plan` on generated data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from medrpn.commands.config_parser import config_sections, parse_training_config, training_config_parser
from medrpn.data.datamodule import LesionDataModule
from medrpn.errors import ConfigError
from medrpn.model.anchor_planning import (
    AnchorSetup,
    anchor_best_iou,
    anchors_per_image,
    plan_anchors,
    torchvision_anchors,
)
from medrpn.model.anchors import AnchorConfig, build_anchor_generator
from medrpn.commands.plan import main, plan_for_config, training_boxes, zoomed
from medrpn.data.synth import write_synthetic_dataset

STAGES = [1, 2, 3, 4]  # strides 4, 8, 16, 32 and the pooled 64


def _boxes(n: int, short: tuple[float, float], aspect: float, both_ways: bool, seed: int, image_size: int = 256) -> np.ndarray:
    """Boxes with a uniform short side, long side = aspect x short; half of them turned 90 degrees if `both_ways`."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(*short, n)
    h = w * aspect
    if both_ways:
        turn = rng.random(n) < 0.5
        w, h = np.where(turn, h, w), np.where(turn, w, h)
    margin = max(short) * aspect
    centre = rng.uniform(margin, image_size - margin, (n, 2))
    return np.stack([centre[:, 0] - w / 2, centre[:, 1] - h / 2, centre[:, 0] + w / 2, centre[:, 1] + h / 2], axis=1)


def _carrying(config: AnchorConfig) -> list[int]:
    return [i for i, level in enumerate(config.sizes) if level]


def test_best_iou_is_the_maximum_over_every_anchor_of_the_generator():
    rng = np.random.default_rng(0)
    for image_size in (256, 100):  # 100: the grids do not divide the image evenly
        centre = rng.uniform(-5, image_size + 5, (300, 2))
        side = rng.uniform(2, 120, (300, 1))
        ratio = np.exp(rng.normal(0, 0.6, (300, 1)))
        wh = np.concatenate([side / np.sqrt(ratio), side * np.sqrt(ratio)], axis=1)
        boxes = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1).astype(np.float32)
        for config in (AnchorConfig(), AnchorConfig([[7.3, 11], [], [33], [64], []], [0.3, 1.0, 2.5])):
            setup = AnchorSetup(config, STAGES)
            kept = [i for i, level in enumerate(config.sizes) if level]
            generator = build_anchor_generator(AnchorConfig([config.sizes[i] for i in kept], config.aspect_ratios), len(kept))
            sides = [math.ceil(image_size / setup.strides[i]) for i in kept]
            images = ImageList(torch.zeros(1, 1, image_size, image_size), [(image_size, image_size)])
            all_anchors = generator(images, [torch.zeros(1, 1, s, s) for s in sides])[0]
            expected = box_iou(torch.as_tensor(boxes), all_anchors).max(dim=1).values.numpy()
            np.testing.assert_allclose(anchor_best_iou(boxes, setup, image_size), expected, atol=1e-6)
            per_position = len(config.aspect_ratios)
            assert anchors_per_image(setup, image_size) == sum(
                s * s * len(config.sizes[i]) * per_position for s, i in zip(sides, kept)
            )


def test_small_elongated_lesions_are_covered_by_the_plan():
    boxes = _boxes(600, short=(6, 20), aspect=3.0, both_ways=True, seed=1)
    plan = plan_anchors(boxes, STAGES, image_size=256, anchors_per_position=3, baseline=AnchorConfig())
    assert plan.coverage >= 0.95
    assert plan.coverage > plan.before.coverage + 0.2 and plan.coverage > plan.torchvision.coverage + 0.2
    assert plan.mean_iou > plan.before.mean_iou
    assert sorted(plan.anchors.aspect_ratios)[0] < 0.5 and sorted(plan.anchors.aspect_ratios)[-1] > 2  # lying and standing
    # no box is larger than 60 px: the coarse levels carry nothing and the plan costs fewer anchors than torchvision's
    assert plan.anchors.sizes[-2:] == [[], []]
    assert plan.anchors_per_image < plan.torchvision.anchors_per_image
    assert plan.torchvision.anchors == torchvision_anchors(5)
    # the plan's score is the real-grid score of its anchors
    np.testing.assert_allclose(plan.planned.best_iou, anchor_best_iou(boxes, AnchorSetup(plan.anchors, STAGES), 256))


def test_a_few_elongated_lesions_pull_a_ratio_outwards():
    # 40 standing lesions (height 3 x width) among 560 round ones: the ratio quantiles all sit near 1,
    # which covers none of the 40; the refinement stretches one ratio until they are covered
    round_ = _boxes(560, short=(16, 40), aspect=1.0, both_ways=False, seed=5)
    standing = _boxes(40, short=(12, 20), aspect=3.0, both_ways=False, seed=6)
    plan = plan_anchors(np.concatenate([round_, standing]), STAGES, image_size=256, anchors_per_position=3)
    assert max(plan.anchors.aspect_ratios) > 2
    assert np.mean(plan.planned.best_iou[560:] >= 0.5) == 1.0
    assert plan.coverage == 1.0


@pytest.mark.parametrize("budget", [1, 2, 4])
def test_plan_respects_the_budget_with_equal_counts_on_every_level(budget):
    boxes = _boxes(300, short=(5, 60), aspect=1.5, both_ways=True, seed=budget)
    plan = plan_anchors(boxes, STAGES, image_size=256, anchors_per_position=budget)
    counts = {len(plan.anchors.sizes[i]) * len(plan.anchors.aspect_ratios) for i in _carrying(plan.anchors)}
    assert len(counts) == 1 and counts.pop() <= budget
    assert plan.before is None
    assert len(plan.anchors.sizes) == len(STAGES) + 1
    assert plan.anchors == plan_anchors(boxes, STAGES, image_size=256, anchors_per_position=budget).anchors  # deterministic


def test_levels_no_box_needs_are_empty_and_every_box_keeps_a_level():
    small = _boxes(200, short=(10, 14), aspect=1.0, both_ways=False, seed=3)
    large = _boxes(200, short=(110, 130), aspect=1.0, both_ways=False, seed=4, image_size=400) * 256 / 400
    plan = plan_anchors(np.concatenate([small, large]), STAGES, image_size=256)
    carrying = _carrying(plan.anchors)
    assert carrying[0] <= 1 and carrying[-1] >= 2  # a fine level for the small boxes, a coarse one for the large
    assert plan.anchors.sizes[-1] == []  # no box needs the pooled stride-64 level
    best = plan.planned.best_iou
    assert np.mean(best[:200] >= 0.5) >= 0.9 and np.mean(best[200:] >= 0.5) == 1.0


def test_planning_over_the_augmentations_zooms_covers_the_lesions_at_those_sizes_too():
    # round lesions of 20-40 px, one anchor per position: planned on the boxes alone, the anchors fit
    # those sizes and miss many of the same lesions zoomed by 0.7 or 1.4, which training shows the model
    boxes = _boxes(200, short=(20, 40), aspect=1.0, both_ways=False, seed=0)
    small, large = zoomed(boxes, 0.7, 256), zoomed(boxes, 1.4, 256)
    np.testing.assert_allclose((small[:, 2:] - small[:, :2]) / (boxes[:, 2:] - boxes[:, :2]), 0.7)
    np.testing.assert_allclose(small[:, :2] + small[:, 2:], boxes[:, :2] + boxes[:, 2:])  # same centres

    def covered(plan, these):
        return np.mean(anchor_best_iou(these, AnchorSetup(plan.anchors, STAGES), 256) >= 0.5)

    plain = plan_anchors(boxes, STAGES, 256, anchors_per_position=1)
    with_zooms = plan_anchors(np.concatenate([boxes, small, large]), STAGES, 256, anchors_per_position=1)
    assert covered(plain, boxes) == 1.0 and covered(plain, small) < 0.9 and covered(plain, large) < 0.9
    assert covered(with_zooms, boxes) == covered(with_zooms, small) == covered(with_zooms, large) == 1.0


def test_bad_budget_and_no_boxes_are_refused():
    with pytest.raises(ConfigError, match="at least 1"):
        plan_anchors(_boxes(10, (8, 9), 1.0, False, 0), STAGES, 256, anchors_per_position=0)
    with pytest.raises(ValueError, match="no boxes"):
        plan_anchors(np.zeros((0, 4)), STAGES, 256)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, n_images=40, image_size=64, seed=11)
    return root


def _config(tmp_path: Path, synth: Path, anchors=None) -> tuple[dict, Path]:
    config = {
        "model": {"backbone": {"returned_stages": [1, 2, 3]}, "anchors": anchors or {"sizes": [[8], [16], [32], [64]]}},
        "data": {"annotations": str(synth / "annotations.csv"), "image_size": 64, "num_workers": 0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return config, path


def test_cli_prints_before_and_after_and_writes_a_config_that_loads(synth, tmp_path, capsys):
    config, path = _config(tmp_path, synth)
    out_path = tmp_path / "planned.yaml"
    main(["--config", str(path), "--output", str(out_path)])
    out = capsys.readouterr().out
    dm = LesionDataModule(**config["data"])
    train_boxes = sum(len(r.boxes) for r in dm.splits["train"])
    all_boxes = sum(len(r.boxes) for r in dm.records)
    assert 0 < train_boxes < all_boxes
    assert (
        f"boxes         {train_boxes} in the training split, at image_size 64 "
        f"(and each at the augmentation's zoom 0.85 and 1.15: {3 * train_boxes} boxes planned for)" in out
    )
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "sizes [[8], [16], [32], [64]]; ratios [0.5, 1.0, 2.0]" in lines["before"]
    assert "sizes [[32], [64], [128], [256]]" in lines["torchvision"]
    assert "per class: nodule " in lines["planned"] and "spiculated " in lines["planned"]
    # the written config, given after the planned one as fit takes it, changes the anchors alone
    parse = lambda *files: parse_training_config(training_config_parser("t", "t"), [a for f in files for a in ("--config", str(f))])[1]  # noqa: E731
    written, given = parse(path, out_path), parse(path)
    data, setup = config_sections(written, out_path)
    assert data == given["data"] and data["annotations"] == config["data"]["annotations"]
    assert {**written["model"], "anchors": None} == {**given["model"], "anchors": None}
    assert setup.returned_stages == [1, 2, 3]
    plan = plan_for_config(config)
    assert setup.anchors == plan.anchors
    assert f"coverage {plan.coverage:.1%}, mean IoU {plan.mean_iou:.3f}, {plan.anchors_per_image} anchors/image" in lines["planned"]
    assert plan.coverage >= plan.before.coverage


def test_the_training_boxes_come_also_at_the_augmentations_smallest_and_largest_zoom(synth, tmp_path):
    config, _ = _config(tmp_path, synth)
    config["data"]["augment"] = {"scale": [0.8, 1.25]}
    found = training_boxes(config["data"])
    train = LesionDataModule(**config["data"]).splits["train"]
    n = sum(len(r.boxes) for r in train)
    assert found.split_boxes == n and found.zooms == (0.8, 1.25) and len(found.boxes) == 3 * n
    np.testing.assert_allclose(found.in_split, np.concatenate([r.boxes for r in train]))  # 64 px images: scale 1
    np.testing.assert_array_equal(found.labels, np.tile(np.concatenate([r.labels for r in train]), 3))
    for i, zoom in enumerate(found.zooms, start=1):
        copy = found.boxes[i * n : (i + 1) * n]
        np.testing.assert_allclose(copy, zoomed(found.in_split, zoom, 64))
        assert copy.min() >= 0 and copy.max() <= 64  # cut at the border, as augmentation cuts them
    config["data"]["augment"] = {"scale": [0.8, 1.25], "mosaic": 0.5, "mosaic_scale": [0.5, 1.6]}
    assert training_boxes(config["data"]).zooms == (0.4, 2.0)  # mosaic's zoom on top of the affine step's
    config["data"]["augment"] = {"affine": 0.0}  # no zoom in training: nothing added
    found = training_boxes(config["data"])
    assert found.zooms == () and len(found.boxes) == found.split_boxes == n


def test_auto_anchors_plan_without_a_before(synth, tmp_path, capsys):
    config, path = _config(tmp_path, synth, anchors="auto")
    plan = plan_for_config(config, anchors_per_position=2)
    assert plan.before is None and plan.coverage > 0
    main(["--config", str(path), "--anchors-per-position", "2"])
    out = capsys.readouterr().out
    assert "\nbefore " not in out and "planned (<=2)" in out


def test_a_bad_config_is_refused_in_one_line_as_fit_refuses_it(tmp_path, capsys):
    # the parser is fit's: a missing file or a setting of the wrong type exits 2 with the reason
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(tmp_path / "nope.yaml")])
    assert exit_.value.code == 2
    assert f"File does not exist: '{tmp_path / 'nope.yaml'}'" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("model: {anchors: 3}\ndata: {annotations: x}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(tmp_path / "bad.yaml")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "model.anchors" in err and "Traceback" not in err


def test_fit_with_anchors_auto_trains_and_records_the_planned_anchors(request, tmp_path_factory):
    """`model.anchors: auto` in a real `medrpn fit`: the plan is printed, and the run's MLflow
    parameters and its checkpoint hold the planned anchors, not the word "auto"."""
    import mlflow
    from trained_run import RUN_NAME, trained_run

    run = trained_run(request, tmp_path_factory)
    assert "medrpn: anchors planned from the training boxes" in run.output
    saved = torch.load(run.ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["anchors"]
    assert saved != "auto" and saved["sizes"] and saved["aspect_ratios"]
    mlflow.set_tracking_uri(run.tracking_uri)
    found = mlflow.search_runs(experiment_names=["medrpn-demo"], filter_string=f"run_name = '{RUN_NAME}'", output_format="list")
    params = found[0].data.params
    assert params["model/anchors/sizes"] == str(saved["sizes"])
