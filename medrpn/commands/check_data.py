"""`medrpn check-data --config CFG`: is this dataset fit to train on? Everything wrong with it, in one report.

It takes what `medrpn fit` takes (config files and overrides, read by `medrpn.commands.config_parser`) and
builds the data the way fit does (collecting every problem instead of stopping at the first),
decodes every image once, and prints:

- images found, readable and unreadable (each unreadable one with path and reason);
- every annotation problem (file, row, reason) and the images it takes out of training;
- boxes per class; box sizes in pixels and, where the pixel spacing is known, millimetres;
- images without boxes; boxes outside the image, inverted, zero-sized, not finite (nan, inf), duplicated;
- patients (split groups) and images per split, and that no patient is in two splits;
- anchor coverage: the share of boxes whose best anchor (the `model.anchors` of the config,
  on the backbone's pyramid levels, after resizing to `data.image_size`) has IoU >= 0.5,
  with a warning below 95% (the RPN cannot learn a box that no anchor matches).

Volumes (annotation formats csv3d, luna16, masks) get the same report per scan, in voxels and
mm (`medrpn.commands.check_volume_data`).

It exits with status 1 when the data cannot be trained on (no usable training image or box, an
empty validation split, or any problem under `on_error: fail`), else 0.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

from medrpn.commands.check_volume_data import VOLUME_FORMATS, check_volumes
from medrpn.commands.data_report import DUPLICATE_IOU, NO_VALIDATION_NOTE, count_duplicates, quantiles
from medrpn.data.annotations import detect_format
from medrpn.data.datamodule import LesionDataModule
from medrpn.data.splits import SPLITS
from medrpn.data.transforms import fit_scale
from medrpn.model.anchor_planning import COVERAGE_IOU, AnchorSetup, anchor_best_iou
from medrpn.commands.config_parser import config_sections, config_source, parse_training_config, training_config_parser

COVERAGE_WARNING = 0.95


def check(config: dict[str, Any], source: str = "config") -> tuple[list[str], list[str]]:
    """Run the checks on a parsed training config (`medrpn.commands.config_parser`; `source` names it in the
    report); returns the report lines and the reasons the data cannot be trained on (empty if it can)."""
    data, anchor_setup = config_sections(config, source)
    if (data.get("format") or detect_format(data["annotations"])) in VOLUME_FORMATS:
        return check_volumes(data, source)
    model = config.get("model") or {}
    model = model.get("init_args", model)
    if model.get("anchors") == "auto":
        from medrpn.commands.plan import plan_for_config  # the anchors `medrpn fit` will plan

        budget = model.get("anchors_per_position", 3)
        anchor_setup.anchors = plan_for_config(config, budget, source=source).anchors
    policy = data.pop("on_error", "skip")
    quiet = logging.getLogger("medrpn.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # every problem is in the report below: no warning per file as well
    try:
        dm = LesionDataModule(**data, on_error="skip")
        dm.check_images(keep=False)
    finally:
        quiet.setLevel(level)
    problems = dm.problems
    out: list[str] = [f"medrpn check-data: {source}"]
    fatal: list[str] = []

    usable = [r for name in SPLITS for r in dm.splits[name]]
    unreadable = [p for p in problems if p.kind in ("missing_image", "unreadable_image")]
    found = len({r.key for r in dm.records} | problems.images)
    out.append(f"annotations   {data.get('annotations')} ({len(dm.class_names)} classes: {', '.join(dm.class_names)})")
    out.append(f"images        found {found}, readable {found - len(unreadable)}, unreadable {len(unreadable)}")
    for p in sorted(unreadable, key=lambda p: p.error.path):
        out.append(f"  unreadable  {p.error.path}: {p.error.reason}")
    other = [p for p in problems if p.kind not in ("missing_image", "unreadable_image")]
    if other:
        out.append(f"problems      {len(other)} in the annotations (each takes its image out of training):")
        for p in other:
            out.append(f"  {p.kind:<13} {p.error}")
    out.append(f"usable        {len(usable)} images ({len(problems.images)} left out)")

    boxes_per_class = Counter(int(label) for r in usable for label in r.labels)
    out.append("boxes/class   " + ", ".join(f"{name} {boxes_per_class[i]}" for i, name in enumerate(dm.class_names)))
    sizes_px, sizes_mm, fitted, labels = [], [], [], []
    for r in usable:
        height, width = dm.images.sizes[r.key]
        spacing = dm.images.spacings.get(r.key)
        w, h = r.boxes[:, 2] - r.boxes[:, 0], r.boxes[:, 3] - r.boxes[:, 1]
        sizes_px += list(zip(w, h))
        if spacing is not None:
            sizes_mm += list(zip(w * spacing[1], h * spacing[0]))
        fitted.append(r.boxes * fit_scale(height, width, dm.image_size))
        labels.append(r.labels)
    px, mm = np.array(sizes_px).reshape(-1, 2), np.array(sizes_mm).reshape(-1, 2)
    out.append(f"box width     {quantiles(px[:, 0], 'px')}")
    out.append(f"box height    {quantiles(px[:, 1], 'px')}")
    if len(mm):
        out.append(f"box width     {quantiles(mm[:, 0], 'mm')}")
        out.append(f"box height    {quantiles(mm[:, 1], 'mm')}  ({len(mm)} of {len(px)} boxes with a known spacing)")
    else:
        out.append("box size mm   unknown: no image states its pixel spacing (set data.read.spacing for PNG/JPEG)")
    counts = problems.counts()
    out.append(f"no boxes      {sum(1 for r in usable if len(r.boxes) == 0)} images without boxes")
    out.append(
        f"bad boxes     outside the image {counts['outside'] + counts['negative']}, inverted {counts['inverted']}, "
        f"zero-sized {counts['zero_size']}, not finite {counts['not_finite']}, "
        f"duplicated {sum(count_duplicates(r) for r in usable)} (IoU >= {DUPLICATE_IOU}, same class)"
    )

    seen: dict[str, str] = {}
    overlap = set()
    for name in SPLITS:
        groups = {dm.groups[r.key] for r in dm.splits[name]}
        overlap |= {g for g in groups if seen.setdefault(g, name) != name}
        n_boxes = sum(len(r.boxes) for r in dm.splits[name])
        out.append(f"split {name:<7} {len(groups)} patient groups, {len(dm.splits[name])} images, {n_boxes} boxes")
    kinds = Counter(g.split(":", 1)[0] for g in dm.groups.values())
    out.append("patients by   " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + " (how each image's patient was found)")
    out.append(f"patient leak  {'none' if not overlap else f'{len(overlap)} patients in two splits'}")

    all_fitted = np.concatenate(fitted) if fitted else np.zeros((0, 4))
    all_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    best = anchor_best_iou(all_fitted, anchor_setup, dm.image_size)
    covered = best >= COVERAGE_IOU
    if len(best):
        share = covered.mean()
        per_class = ", ".join(
            f"{name} {covered[all_labels == i].mean():.1%}" for i, name in enumerate(dm.class_names) if np.any(all_labels == i)
        )
        sizes = ", ".join(str(s) for level in anchor_setup.anchors.sizes for s in level)
        out.append(
            f"anchors       {share:.1%} of {len(best)} boxes have an anchor with IoU >= {COVERAGE_IOU} at image_size "
            f"{dm.image_size} (sizes {sizes}; ratios {anchor_setup.anchors.aspect_ratios}); per class: {per_class}"
        )
        if share < COVERAGE_WARNING:
            side = np.sqrt((all_fitted[:, 2] - all_fitted[:, 0]) * (all_fitted[:, 3] - all_fitted[:, 1]))[~covered]
            out.append(
                f"WARNING       anchor coverage below {COVERAGE_WARNING:.0%}: the uncovered boxes have sides "
                f"(sqrt area, input px) {quantiles(side, 'px')}; fit model.anchors.sizes/aspect_ratios to them"
            )

    if not dm.splits["train"]:
        fatal.append("no usable image in the training split")
    elif sum(len(r.boxes) for r in dm.splits["train"]) == 0:
        fatal.append("no box in the training split: nothing to learn")
    if not dm.splits["val"] and dm.validation_by_choice_none:
        out.append(NO_VALIDATION_NOTE)
    elif not dm.splits["val"]:
        fatal.append("the validation split is empty (raise val_fraction or add images)")
    if policy == "fail" and len(problems):
        fatal.append(f"on_error is 'fail' and there are {len(problems)} problems: training would stop at the first")
    if overlap:
        fatal.append("patients in two splits")
    return out, fatal


def main(argv: list[str]) -> None:
    parser = training_config_parser(
        "medrpn check-data", "Check a dataset before training: images, boxes, splits, anchor coverage. "
        "Takes what `medrpn fit` takes (--config files, --data.* and --model.* overrides)."
    )
    args, config = parse_training_config(parser, argv)
    lines, fatal = check(config, config_source(args))
    print("\n".join(lines))
    if fatal:
        print("verdict       cannot be trained on: " + "; ".join(fatal))
        raise SystemExit(1)
    print("verdict       ready to train")
