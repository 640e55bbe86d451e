"""Nested duplicate findings: containment-aware suppression measured on a checkpoint.

    python bench/nested_findings.py --ckpt brain/checkpoints/best.ckpt [--split val] [--thresholds 0.9 0.8 0.7 0.6]

NMS compares boxes by IoU, so a smaller box of the same lesion inside a larger one (IoU about
their area ratio, e.g. 0.35) survives it and a reader sees two findings for one lesion. The
checkpoint runs once over the split (on the data settings it was trained with); its detections
are then filtered by `medrpn.model.box_ops.suppress_contained` at each threshold (off first), as
`model.containment_thresh` would filter them, and scored. Printed per threshold: CPM under the
checkpoint's hit rule, CPM at IoU >= 0.5, class-aware mAP@0.5, and at the checkpoint's operating
point (its stored score threshold) the false positives per image, the sensitivity, and the
findings per found lesion (findings whose box has at least half of its area or of the lesion's
in common with a lesion, per lesion that has one: 1.0 means one finding per lesion).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medrpn.training.checkpoint_file import read_checkpoint
from medrpn.commands.evaluate import load_checkpoint_and_data
from medrpn.metrics.detection import DetectionMetrics
from medrpn.model.box_ops import intersection_over_smaller, suppress_contained


def _findings_per_lesion(detections: list[dict], targets: list[dict], threshold: float) -> float:
    counts = []
    for found, target in zip(detections, targets):
        boxes = found["boxes"][found["scores"] >= threshold]
        for lesion in target["boxes"]:
            both = torch.cat([lesion[None], boxes])
            share = intersection_over_smaller(both)[0, 1:]
            n = int((share >= 0.5).sum())
            if n:
                counts.append(n)
    return sum(counts) / len(counts) if counts else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    args = parser.parse_args()
    saved = read_checkpoint(args.ckpt, mmap=True)
    data = {k: v for k, v in (saved.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    module, datamodule = load_checkpoint_and_data(args.ckpt, {**data, "num_workers": 0})
    module.model.containment_thresh = None
    op = (saved.get("operating_point") or {}).get("score_threshold", 0.5)
    loader = datamodule.val_dataloader() if args.split == "val" else datamodule.test_dataloader()
    torch.set_num_threads(2)
    batches = []
    with torch.inference_mode():
        for batch in loader:
            if len(batch["images"]) == 0:
                continue
            out = module.model(batch["images"])
            batches.append((out.detections, batch["targets"], out.proposals, batch.get("meta")))
    hp = module.hparams
    print(f"{args.ckpt} on the {args.split} split, {sum(len(b[1]) for b in batches)} images; operating point score >= {op:.4g}")
    print(f"{'containment':<12}{'CPM':>8}{'CPM@0.5':>9}{'mAP@0.5':>9}{'FP/img@op':>11}{'sens@op':>9}{'findings/lesion@op':>20}")
    for threshold in [None, *args.thresholds]:
        metric = DetectionMetrics(class_names=list(hp.class_names), froc_hit_rule=hp.froc_hit_rule,
                                  froc_iou_threshold=hp.froc_iou_threshold)
        all_found, all_targets = [], []
        for detections, targets, proposals, meta in batches:
            if threshold is not None:
                kept = [suppress_contained(d["boxes"], d["scores"], threshold) for d in detections]
                detections = [{k: v[i] for k, v in d.items()} for d, i in zip(detections, kept)]
            metric.update(detections, targets, proposals, meta)
            all_found += detections
            all_targets += targets
        report = metric.report(score_threshold=op)
        s = report.scalars
        name = "off" if threshold is None else f"{threshold:g}"
        print(f"{name:<12}{s['cpm']:>8.3f}{s['cpm_iou50']:>9.3f}{s['map50']:>9.3f}{s['op_fp_per_image']:>11.3f}"
              f"{s['op_sensitivity']:>9.3f}{_findings_per_lesion(all_found, all_targets, op):>20.3f}")


if __name__ == "__main__":
    main()
