"""The MS lesion recipe (`configs/ms_lesions_3d.yaml`) on the real 3D MRI of ../shared/data/ms-lesions-3d,
leave one patient out: three runs of `medrpn fit`, each trained on two patients and tested on the
third, then `medrpn predict` on each held-out scan with its own run's model, and the per-scan FROC
of the three held-out scans pooled (as nnDetection pools its folds), by 3D IoU >= 0.1 and 0.3 and
by LUNA16's centre rule.

The data's three imaged patients (FLAIR, T1, T2, contrast T1; the other 27 have masks only) are
written as an ``image,mask,patient_id`` CSV; lesions are the masks' face-connected components of
>= 10 voxels (the recipe's `data.masks.min_voxels`). Nothing is written into the data folder.

    python bench/ms_lesions_3d.py [--data ../shared/data/ms-lesions-3d] [--out /tmp/medrpn-ms]
                                  [--epochs N] [--folds 0 1 2] [-- extra medrpn fit options]

Prints per fold the time of `medrpn fit` and of `medrpn predict` on the held-out scan and that
scan's CPM, then the pooled FROC (sensitivity at 1/8 ... 8 false positives per scan, CPM), the
share of lesions found at any score by size, and the MLflow store the runs are in. The runs do
not test on their own (the held-out scan is measured once, through predict).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medrpn.data.annotations import read_annotations
from medrpn.data.mask_boxes import MaskConfig
from medrpn.metrics.froc import cpm, froc_points, match_image

PATIENTS = ("patient07", "patient19", "patient26")  # the ones with images
MIN_VOXELS = 10
RULES = (("3D IoU >= 0.1", "iou", 0.1), ("3D IoU >= 0.3", "iou", 0.3), ("centre in box (LUNA16)", "center", 0.0))


def write_dataset(data: Path, out: Path) -> Path:
    """The annotation CSV (absolute paths, so it can live outside the data folder) and one split
    file per held-out patient (fold k tests PATIENTS[k], trains on the others, validates on none)."""
    missing = [p for p in PATIENTS if not (data / p / "FLAIR.nii.gz").is_file()]
    if missing:
        raise SystemExit(f"{data}: no FLAIR.nii.gz for {', '.join(missing)}; is this the ms-lesions-3d folder?")
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "masks.csv"
    rows = [f"{(data / p / 'FLAIR.nii.gz').resolve()},{(data / p / 'lesions.nii.gz').resolve()},{p}" for p in PATIENTS]
    csv.write_text("image,mask,patient_id\n" + "\n".join(rows) + "\n", encoding="utf-8")
    for k, held in enumerate(PATIENTS):
        flair = lambda p: str((data / p / "FLAIR.nii.gz").resolve())
        split = {"train": [flair(p) for p in PATIENTS if p != held], "val": [], "test": [flair(held)]}
        (out / f"fold{k}.json").write_text(json.dumps(split, indent=1), encoding="utf-8")
    return csv


def run(cmd: list[str], log: Path) -> tuple[float, str]:
    """Runs a medrpn command, its output to `log`; returns the seconds it took and its output."""
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as stream:
        done = subprocess.run(cmd, check=False, stdout=stream, stderr=subprocess.STDOUT, cwd=log.parent)
    text = log.read_text(errors="replace", encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {done.returncode}); its output: {log}\n{text[-3000:]}")
    return time.monotonic() - start, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ms-lesions-3d")
    parser.add_argument("--out", type=Path, default=Path("/tmp/medrpn-ms"))
    parser.add_argument("--epochs", type=int, default=None, help="instead of the recipe's max_epochs")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("fit_options", nargs=argparse.REMAINDER, help="after --: more `medrpn fit` options")
    args = parser.parse_args()
    extra = [o for o in args.fit_options if o != "--"]
    out = args.out.resolve()
    csv = write_dataset(args.data, out)
    tracking = f"sqlite:///{out / 'mlruns.db'}"
    records, _ = read_annotations(csv, masks=MaskConfig(min_voxels=MIN_VOXELS))
    truth = {Path(r.image_path).parent.name: torch.as_tensor(r.boxes).reshape(-1, 6) for r in records}
    print(f"data: {', '.join(f'{p} {len(truth[p])} lesions' for p in PATIENTS)} (components >= {MIN_VOXELS} voxels)")

    results = {name: ([], []) for name, _, _ in RULES}
    sizes, found_by_size = [], []
    for k in args.folds:
        held = PATIENTS[k]
        fold = out / f"fold{k}"
        fold.mkdir(exist_ok=True)
        fit = [sys.executable, "-m", "medrpn", "fit", "--config", str(ROOT / "configs" / "ms_lesions_3d.yaml"),
               "--data.annotations", str(csv), "--data.split.file", str(out / f"fold{k}.json"),
               "--trainer.logger.init_args.tracking_uri", tracking,
               "--trainer.logger.init_args.run_name", f"ms-lesions-3d-test-{held}",
               "--trainer.limit_test_batches", "0"]  # the held-out scan is measured once, below, through predict
        if args.epochs is not None:
            fit += ["--trainer.max_epochs", str(args.epochs)]
        seconds, _ = run(fit + extra, fold / "fit.log")
        print(f"fold {k} (test {held}): medrpn fit took {seconds / 60:.1f} min (start-up and anchor planning included)")
        ckpt = fold / "ms" / "checkpoints" / "final.ckpt"
        predictions = fold / "predictions"
        seconds, _ = run([sys.executable, "-m", "medrpn", "predict", "--ckpt", str(ckpt),
                          "--input", str(args.data / held / "FLAIR.nii.gz"), "--output", str(predictions),
                          "--score-threshold", "0.01", "--overwrite"], fold / "predict.log")
        report = json.loads(next(predictions.rglob("findings.json")).read_text(encoding="utf-8"))
        findings = report["findings"]
        boxes = torch.tensor([f["box_voxels"] for f in findings], dtype=torch.float32).reshape(-1, 6)
        scores = torch.tensor([f["score"] for f in findings], dtype=torch.float32)
        gt = truth[held]
        print(f"  predict: {seconds:.0f} s for the scan (read, windows, outputs), {len(findings)} findings >= 0.01")
        for name, rule, threshold in RULES:
            best, fp = match_image(boxes, scores, gt, iou_threshold=threshold, rule=rule)
            results[name][0].append(best)
            results[name][1].append(fp)
            one = froc_points(best, fp, n_images=1)
            print(f"  {name}: CPM {cpm(one):.3f}, sensitivity at 1 FP/scan {one[1.0]:.3f}")
        sizes.append(((gt[:, 3:] - gt[:, :3]).prod(dim=1)) ** (1 / 3))
        found_by_size.append(results[RULES[0][0]][0][-1])

    n = len(args.folds)
    print(f"\npooled over {n} held-out scan(s), {sum(len(truth[PATIENTS[k]]) for k in args.folds)} lesions:")
    for name, _, _ in RULES:
        best, fp = results[name]
        points = froc_points(torch.cat(best), torch.cat(fp), n_images=n)
        print(f"  {name}: " + ", ".join(f"{r:g}: {s:.3f}" for r, s in points.items()) + f"; CPM {cpm(points):.3f}")
    side, best = torch.cat(sizes), torch.cat(found_by_size)
    for low, high in ((0, 4), (4, 8), (8, 1e9)):
        chosen = (side >= low) & (side < high)
        if chosen.any():
            hit = (best[chosen] > -float("inf")).float().mean().item()
            print(f"  lesions {low}-{'' if high > 1e8 else high} mm (box side): {int(chosen.sum())}, found at any score (IoU >= 0.1) {hit:.3f}")
    print(f"MLflow runs: mlflow ui --backend-store-uri {tracking}")


if __name__ == "__main__":
    main()
