"""`medrpn plan --config CFG`: anchors planned from the training boxes, before and after.

Takes what `medrpn fit` takes (config files and overrides, read by `medrpn.commands.config_parser`), takes the boxes of the TRAINING split
only (the split `medrpn fit` will use; validation and test boxes must not shape the model), fits
them to `data.image_size` as training does, adds each box at the smallest and largest zoom of the
training augmentation (`data.augment.scale`, when `augment.affine` is on: the model learns those
sizes too, and lesions a little larger or smaller than any in the training split then still have
an anchor), and runs `medrpn.model.anchor_planning.plan_anchors`.
It prints the anchor coverage (share of boxes with an anchor at IoU >= 0.5), the mean best IoU
and the anchors per image of the config's anchors, of torchvision's default anchors and of the
plan, overall and per class; `--output NEW.yaml` writes the plan as a config of its own, to give
after yours: `medrpn fit --config C --config NEW.yaml` trains with the planned anchors (your
config, its comments and the other settings stay as they are). `plan_for_config` does the same for an already parsed config (`anchors: auto`).
Volumes (3D annotations) are planned by `medrpn.commands.plan_volumes`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from medrpn.data.datamodule import LesionDataModule
from medrpn.data.transforms import AugmentConfig, fit_scale
from medrpn.errors import ConfigError, DataError
from medrpn.model.anchor_planning import COVERAGE_IOU, AnchorPlan, AnchorScore, plan_anchors
from medrpn.model.anchors import AnchorConfig
from medrpn.commands.config_parser import config_sections, config_source, parse_training_config, training_config_parser

AUTO = "auto"


@dataclass
class TrainingBoxes:
    """The training split's boxes in network-input pixels, as training sees them.

    Attributes:
        boxes: (N, 4) xyxy, scaled as training scales its images to `image_size`, followed by
            the same boxes at each of `zooms`.
        labels: (N,) 0-based class of each box.
        class_names: names of the classes, in label order.
        image_size: the network input side.
        split_boxes: how many boxes the training split holds (the first `split_boxes` of `boxes`).
        zooms: the augmentation's zoom factors at which each box was added again (none when off).
    """

    boxes: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    image_size: int
    split_boxes: int
    zooms: tuple[float, ...] = ()

    @property
    def in_split(self) -> np.ndarray:
        """The training split's own boxes, without the zoomed copies."""
        return self.boxes[: self.split_boxes]


def augmentation_zooms(augment: AugmentConfig) -> tuple[float, ...]:
    """The extreme zoom factors of the training augmentation other than 1 (none when it does not zoom).

    Its affine step and its mosaic each zoom by a factor in a range; both together, by the product.
    """
    ranges = [r for r, p in ((augment.scale, augment.affine), (augment.mosaic_scale, augment.mosaic)) if p > 0]
    if not ranges:
        return ()
    low = float(np.prod([min(r) for r in ranges]))
    high = float(np.prod([max(r) for r in ranges]))
    return tuple(sorted({low, high} - {1.0}))


def zoomed(boxes: np.ndarray, factor: float, image_size: int) -> np.ndarray:
    """`boxes` (xyxy) scaled by `factor` about their own centres, cut at the image border as augmentation cuts them.

    The augmentation zooms about the image centre, which also moves each box; anchor coverage
    depends on a box's position only through its offset from the anchor grid, which a move of
    any size leaves as varied as before, so the box's own centre stands in for it.
    """
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    halves = (boxes[:, 2:] - boxes[:, :2]) / 2 * factor
    return np.clip(np.concatenate([centres - halves, centres + halves], axis=1), 0, image_size)


def training_boxes(data: dict[str, Any]) -> TrainingBoxes:
    """The boxes of the training split of the data module that `data` (the config's `data` arguments) builds.

    Images are only probed for their size (cache mode "none"): planning needs no pixels. Images
    that cannot be read and boxes with a problem leave the split, as in training.
    """
    data = {**data, "cache": {"mode": "none"}}
    data.pop("on_error", None)
    quiet = logging.getLogger("medrpn.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # problems are `medrpn check-data`'s report; planning uses what is left
    try:
        dm = LesionDataModule(**data, on_error="skip")
        dm.check_images(keep=False)
    finally:
        quiet.setLevel(level)
    train = dm.splits["train"]
    boxes = [r.boxes * fit_scale(*dm.images.sizes[r.key], dm.image_size) for r in train]
    labels = [r.labels for r in train]
    split_boxes = np.concatenate(boxes).astype(np.float64) if boxes else np.zeros((0, 4))
    split_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    zooms = augmentation_zooms(dm.augment)
    return TrainingBoxes(
        np.concatenate([split_boxes] + [zoomed(split_boxes, f, dm.image_size) for f in zooms]),
        np.tile(split_labels, 1 + len(zooms)),
        list(dm.class_names),
        dm.image_size,
        len(split_boxes),
        zooms,
    )


def _model_section(config: dict[str, Any]) -> dict[str, Any]:
    """The model arguments of a config (inside `init_args` when the model is given by `class_path`), created if absent."""
    model = config.setdefault("model", {}) or {}
    config["model"] = model
    return model.setdefault("init_args", {}) if "class_path" in model else model


def plan_for_config(config: dict[str, Any], anchors_per_position: int = 3, source: str | Path = "config") -> AnchorPlan:
    """Plans anchors for a parsed training config (what `anchors: auto` runs).

    Args:
        config: the parsed YAML. `model.anchors` may be `auto` (then nothing is compared as
            "before"), a mapping of sizes and aspect ratios, or absent (the model's default anchors).
        anchors_per_position: the budget of sizes x ratios per position.
        source: the config's name in errors.
    """
    return _plan(config, anchors_per_position, source)[0]


def _plan(config: Any, anchors_per_position: int, source: str | Path) -> tuple[AnchorPlan, TrainingBoxes]:
    """`plan_for_config`, with the training boxes it planned from (for the per-class report)."""
    config = copy.deepcopy(config)
    model = _model_section(config) if isinstance(config, dict) else {}
    auto = model.get("anchors") == AUTO
    if auto:
        del model["anchors"]
    elif model.get("anchors") is not None and not isinstance(model["anchors"], dict):
        raise ConfigError(f"{source}: model.anchors must be '{AUTO}' or a mapping of sizes and aspect_ratios")
    data, setup = config_sections(config, source)
    found = training_boxes(data)
    if len(found.boxes) == 0:
        raise DataError(data.get("annotations", source), "no box in the training split: nothing to plan anchors from")
    baseline = None if auto else setup.anchors
    plan = plan_anchors(found.boxes, setup.returned_stages, found.image_size, anchors_per_position, baseline)
    return plan, found


def planned_config(anchors: AnchorConfig, source: str) -> str:
    """The YAML of a config holding only `model.anchors`, to be given after the config planned from."""
    anchors_yaml = yaml.safe_dump({"model": {"anchors": asdict(anchors)}}, sort_keys=False, default_flow_style=None)
    return f"# anchors planned by `medrpn plan` from the training boxes of {source}\n{anchors_yaml}"


def _describe(anchors: AnchorConfig) -> str:
    sizes = "[" + ", ".join("[" + ", ".join(f"{s:g}" for s in level) + "]" for level in anchors.sizes) + "]"
    return f"sizes {sizes}; ratios {[float(f'{r:g}') for r in anchors.aspect_ratios]}"


def _line(name: str, score: AnchorScore, found: TrainingBoxes) -> str:
    covered = score.best_iou >= COVERAGE_IOU
    per_class = ", ".join(
        f"{cls} {covered[found.labels == i].mean():.1%}" for i, cls in enumerate(found.class_names) if np.any(found.labels == i)
    )
    return (
        f"{name:<13} coverage {score.coverage:.1%}, mean IoU {score.mean_iou:.3f}, {score.anchors_per_image} anchors/image "
        f"({_describe(score.anchors)}); per class: {per_class}"
    )


def report(plan: AnchorPlan, found: TrainingBoxes, budget: int) -> list[str]:
    """The lines `medrpn plan` prints."""
    zooms = (
        f" (and each at the augmentation's zoom {' and '.join(f'{z:g}' for z in found.zooms)}: {len(found.boxes)} boxes planned for)"
        if found.zooms
        else ""
    )
    lines = [
        f"boxes         {found.split_boxes} in the training split, at image_size {found.image_size}{zooms}; "
        f"levels of stride {', '.join(map(str, plan.strides))}; coverage = share of boxes with an anchor at IoU >= {COVERAGE_IOU}",
    ]
    if plan.before is not None:
        lines.append(_line("before", plan.before, found))
    lines.append(_line("torchvision", plan.torchvision, found))
    lines.append(_line(f"planned (<={budget})", plan.planned, found))
    return lines


def _on_volumes(config: dict[str, Any], source: str) -> bool:
    """Whether the config's annotations are 3D (planned by `medrpn.commands.plan_volumes`)."""
    from medrpn.commands.check_volume_data import VOLUME_FORMATS
    from medrpn.data.annotations import detect_format

    data, _ = config_sections(config, source)
    return (data.get("format") or detect_format(data["annotations"])) in VOLUME_FORMATS


def main(argv: list[str]) -> None:
    parser = training_config_parser(
        "medrpn plan",
        "Plan anchor sizes and aspect ratios from the training boxes; compare with the config's anchors. "
        "Takes what `medrpn fit` takes (--config files, --data.* and --model.* overrides).",
    )
    parser.add_argument(
        "--anchors-per-position", type=int, default=3, help="budget: sizes x ratios per position (default 3)"
    )
    parser.add_argument(
        "--output", type=Optional[Path], default=None,
        help="write the planned model.anchors as a config to give after yours (medrpn fit --config C --config NEW.yaml)",
    )
    args, config = parse_training_config(parser, argv)
    if args.anchors_per_position < 1:
        parser.error("--anchors-per-position must be at least 1")
    source = config_source(args)
    if _on_volumes(config, source):
        from medrpn.commands.plan_volumes import run

        run(config, args.anchors_per_position, source, args.output)
        return
    plan, found = _plan(config, args.anchors_per_position, source)
    print(f"medrpn plan: {source}")
    print("\n".join(report(plan, found, args.anchors_per_position)))
    planned = yaml.safe_dump(asdict(plan.anchors), default_flow_style=True, sort_keys=False, width=1_000_000).strip()
    print(f"plan          model.anchors: {planned}")
    if args.output is not None:
        try:
            args.output.write_text(planned_config(plan.anchors, source), encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{args.output}: cannot write the planned config ({e.strerror})") from None
        print(f"wrote         {args.output}: train with it given after your config, "
              f"e.g. medrpn fit --config {source.split(', ')[-1]} --config {args.output}")
