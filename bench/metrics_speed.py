"""Seconds spent in the evaluation metrics for a large validation split.

    python bench/metrics_speed.py [--n-images 5000] [--n-preds 100] [--n-proposals 300] [--batch-size 16]
                                  [--bootstrap 1000] [--no-reference] [--torchmetrics]

Synthetic but realistic detections: 0-3 lesions per image (2 classes, 0.7 mm pixels, 3 images
per patient), ``--n-preds`` predictions per image (a third of them near a lesion, higher scores)
and ``--n-proposals`` RPN proposals per image. ``DetectionMetrics`` gets them batch by batch as a
validation loop would, then:
- ``update``: the per-batch matching, summed over the epoch;
- ``epoch figures``: ``report`` without bootstrap (what every validation epoch computes: FROC
  per class, mAP at IoU 0.1/0.5/0.5:0.95, proposal recall by size, operating point);
- ``final evaluation``: ``report`` with ``--bootstrap`` patient resamples for the intervals;
- ``faster-coco-eval``: the library's own mAP on the same arrays (set-up and evaluation), and
  the largest difference from medrpn's (it must be 0);
- with ``--torchmetrics``: torchmetrics' ``MeanAveragePrecision`` (faster_coco_eval backend),
  which medrpn used before, fed the same batches.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from medrpn.metrics import DetectionMetrics, faster_coco_eval_average_precision


def synthetic_batches(n_images: int, n_preds: int, n_proposals: int, batch_size: int, seed: int = 0):
    """Batches of (preds, targets, proposals, meta) for ``DetectionMetrics.update``."""
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, n_images, batch_size):
        preds, targets, proposals, meta = [], [], [], []
        for i in range(start, min(start + batch_size, n_images)):
            n_gt = int(rng.integers(0, 4))
            xy = rng.uniform(0, 400, (n_gt, 2))
            gt = np.concatenate([xy, xy + rng.uniform(8, 80, (n_gt, 2))], axis=1)
            near = n_preds // 3 if n_gt else 0
            anchor = gt[rng.integers(0, n_gt, near)] if n_gt else np.zeros((0, 4))
            jittered = anchor + rng.normal(0, 5, (near, 4))
            xy = rng.uniform(0, 450, (n_preds - near, 2))
            far = np.concatenate([xy, xy + rng.uniform(8, 80, (n_preds - near, 2))], axis=1)
            boxes = np.concatenate([jittered, far])
            boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
            scores = np.concatenate([rng.beta(4, 2, near), rng.beta(2, 4, n_preds - near)])
            order = np.argsort(-scores)
            preds.append({
                "boxes": torch.from_numpy(boxes[order].astype(np.float32)),
                "scores": torch.from_numpy(scores[order].astype(np.float32)),
                "labels": torch.from_numpy(rng.integers(0, 2, n_preds)),
            })
            targets.append({"boxes": torch.from_numpy(gt.astype(np.float32)), "labels": torch.from_numpy(rng.integers(0, 2, n_gt))})
            xy = rng.uniform(0, 450, (n_proposals, 2))
            props = np.concatenate([xy, xy + rng.uniform(8, 120, (n_proposals, 2))], axis=1)
            props[: min(n_gt * 3, n_proposals)] = np.repeat(gt, 3, axis=0)[:n_proposals] + rng.normal(0, 4, (min(n_gt * 3, n_proposals), 4))
            proposals.append(torch.from_numpy(props.astype(np.float32)))
            meta.append({"scale": 1.0, "spacing": (0.7, 0.7), "patient_id": f"P{i // 3}"})
        batches.append((preds, targets, proposals, meta))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=5000)
    parser.add_argument("--n-preds", type=int, default=100, help="predictions per image")
    parser.add_argument("--n-proposals", type=int, default=300, help="RPN proposals per image")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the final evaluation")
    parser.add_argument("--no-reference", action="store_true", help="skip faster-coco-eval's own evaluation")
    parser.add_argument("--torchmetrics", action="store_true", help="also time torchmetrics' MeanAveragePrecision")
    args = parser.parse_args()

    batches = synthetic_batches(args.n_images, args.n_preds, args.n_proposals, args.batch_size)
    print(
        f"{args.n_images} images x {args.n_preds} predictions, {args.n_proposals} proposals each, batches of "
        f"{args.batch_size}; torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    metric = DetectionMetrics(class_names=["nodule", "mass"])
    start = time.perf_counter()
    for preds, targets, proposals, meta in batches:
        metric.update(preds, targets, proposals, meta)
    t_update = time.perf_counter() - start
    start = time.perf_counter()
    epoch = metric.report(target_fp_per_image=1.0)
    t_epoch = time.perf_counter() - start
    start = time.perf_counter()
    final = metric.report(n_bootstrap=args.bootstrap, target_fp_per_image=1.0)
    t_final = time.perf_counter() - start
    s = epoch.scalars
    print(f"{'update (whole epoch)':<34}{t_update:8.2f} s   ({1e3 * t_update / len(batches):.1f} ms per batch)")
    print(f"{'epoch figures (no bootstrap)':<34}{t_epoch:8.2f} s   CPM {s['cpm']:.4f}, mAP@0.5 {s['map50']:.4f}, "
          f"RPN recall@100 {s['rpn_recall100']:.4f}")
    print(f"{f'final evaluation ({args.bootstrap} resamples)':<34}{t_final:8.2f} s   CPM 95% interval "
          f"[{final.scalars['cpm_ci_low']:.4f}, {final.scalars['cpm_ci_high']:.4f}] over {final.settings['n_patients']} patients")
    if not args.no_reference:
        r = metric.records()
        start = time.perf_counter()
        library = faster_coco_eval_average_precision(
            r.pred_image, r.pred_box, r.pred_score, r.pred_label, r.gt_image, r.gt_box, r.gt_label, 2, r.n_images
        )
        t_ref = time.perf_counter() - start
        diff = max(abs(library[k] - s[k]) for k in ("map10", "map50", "map50_95"))
        print(f"{'faster-coco-eval (mAP only)':<34}{t_ref:8.2f} s   largest mAP difference from medrpn: {diff:.2e}")
    if args.torchmetrics:
        from torchmetrics.detection import MeanAveragePrecision

        tm = MeanAveragePrecision(iou_thresholds=[0.5], backend="faster_coco_eval")
        start = time.perf_counter()
        for preds, targets, _, _ in batches:
            tm.update(preds, targets)
        value = float(tm.compute()["map"])
        t_tm = time.perf_counter() - start
        print(f"{'torchmetrics mAP@0.5 (before)':<34}{t_tm:8.2f} s   mAP@0.5 {value:.4f}")


if __name__ == "__main__":
    main()
