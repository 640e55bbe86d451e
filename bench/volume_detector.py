"""3D detectors side by side on synthetic MR volumes at one CPU budget: phantoms (`medrpn synth
--volumes`) -> read and annotated (csv3d) -> the same patches -> a detector trained for a time
budget -> whole held-out scans by sliding windows of the same size -> per-scan FROC, scored alike.

`--system medrpn`: medrpn's 3D two-stage detector (`medrpn.model.detector_3d`, its defaults).
`--system monai_retinanet`: MONAI's 3D `RetinaNetDetector` set up as MONAI's LUNA16 detection
tutorial does (`bench/detectors/monai_volume_system.py`). Run them one after the other with the CPU
to themselves: the budget is wall-clock time.

Prints training speed (patches and voxels per second), inference time per scan, peak memory, and
per-scan FROC sensitivity at 1/8 ... 8 false positives per scan with CPM, at 3D IoU >= 0.1 and
0.3 and by LUNA16's centre rule. A finding counts whatever its class.

    python bench/volume_detector.py [--system medrpn|monai_retinanet] [--minutes 10] [--volumes 40]
                                    [--out /tmp/medrpn-volumes]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrpn.data.annotations import read_annotations  # noqa: E402
from medrpn.data.synth_volumes import write_synthetic_volumes  # noqa: E402
from medrpn.data.volume_files import read_volume  # noqa: E402
from medrpn.data.volume_patches import VolumePatches, scale_to_unit  # noqa: E402
from medrpn.metrics.froc import cpm, froc_points, match_image  # noqa: E402
from medrpn.model.detector_3d import Detector3DConfig, build_detector_3d  # noqa: E402
from medrpn.model.sliding_window_3d import detect_by_windows  # noqa: E402

PATCH = (48, 48, 16)
WINDOW, OVERLAP = (64, 64, 32), 0.5


class MedrpnVolumeSystem:
    """medrpn's 3D detector: losses on a batch of patches, detections on a whole scan by windows."""

    description = "medrpn 3D two-stage (ResNet + FPN, RPN, RoI Align 3D, second stage), defaults"

    def __init__(self, num_classes: int) -> None:
        self.model = build_detector_3d(Detector3DConfig(num_classes=num_classes))

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-4)

    def losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        return self.model(images, targets).losses

    def detect(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        return detect_by_windows(lambda crop: self.model(crop[None]).detections[0], volume, window=WINDOW, overlap=OVERLAP)


def build_system(name: str, num_classes: int, monai_depth: str = "resnet50"):
    if name == "medrpn":
        return MedrpnVolumeSystem(num_classes)
    from bench.detectors.monai_volume_system import MonaiVolumeSystem

    return MonaiVolumeSystem(num_classes, window=WINDOW, overlap=OVERLAP, depth=monai_depth)


def collate(batch):
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["medrpn", "monai_retinanet"], default="medrpn")
    parser.add_argument("--monai-depth", default="resnet50", help="MONAI's ResNet (the tutorial's resnet50, or resnet18, resnet10)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget")
    parser.add_argument("--volumes", type=int, default=40, help="phantoms; the last quarter are held out")
    parser.add_argument("--out", type=Path, default=Path("/tmp/medrpn-volumes"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    summary = write_synthetic_volumes(args.out, n_volumes=args.volumes, seed=args.seed)
    records, classes = read_annotations(args.out / "annotations.csv")
    n_test = max(1, len(records) // 4)
    train, test = records[:-n_test], records[-n_test:]  # one volume per patient: split by patient
    print(f"data: {summary['volumes']} volumes ({summary['dicom_series']} DICOM series, {summary['nifti']} NIfTI), "
          f"lesions {summary['lesions']}; train {len(train)}, held out {len(test)} ({sum(len(r.boxes) for r in test)} lesions)")

    system = build_system(args.system, len(classes), args.monai_depth)
    model = system.model
    print(f"system: {system.description}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    patches = VolumePatches(train, PATCH, positive_fraction=0.5, samples_per_volume=4, seed=args.seed)
    loader = DataLoader(patches, batch_size=args.batch_size, shuffle=True, collate_fn=collate, num_workers=0)
    optimizer = system.optimizer()
    model.train()
    start, seen, steps, epoch = time.monotonic(), 0, 0, 0
    budget = args.minutes * 60
    while time.monotonic() - start < budget:
        patches.epoch = epoch
        for images, targets in loader:
            losses = system.losses(images, targets)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            seen += len(images)
            steps += 1
            if steps % 25 == 0:
                print(f"  step {steps}: loss {total.item():.3f} ({', '.join(f'{k} {v.item():.3f}' for k, v in losses.items())})")
            if time.monotonic() - start >= budget:
                break
        epoch += 1
    elapsed = time.monotonic() - start
    voxels = seen * PATCH[0] * PATCH[1] * PATCH[2]
    print(f"training: {steps} steps, {seen} patches in {elapsed / 60:.1f} min: {seen / elapsed:.2f} patches/s, "
          f"{voxels / elapsed / 1e6:.2f} M voxels/s, {epoch} passes over the training volumes")

    model.eval()
    results = {rule: ([], []) for rule in ("iou0.1", "iou0.3", "center")}
    infer = 0.0
    for record in test:
        volume = torch.as_tensor(scale_to_unit(read_volume(record.image_path).array))[None]
        t = time.monotonic()
        with torch.no_grad():
            found = system.detect(volume)
        infer += time.monotonic() - t
        gt = torch.as_tensor(record.boxes)
        for rule, (best, fp) in results.items():
            kind, threshold = ("center", 0.0) if rule == "center" else ("iou", float(rule[3:]))
            b, f = match_image(found["boxes"], found["scores"], gt, iou_threshold=threshold, rule=kind)
            best.append(b)
            fp.append(f)
    print(f"inference: {infer / len(test):.2f} s per {tuple(read_volume(test[0].image_path).shape)} scan (sliding windows {WINDOW}, overlap {OVERLAP})")
    for rule, (best, fp) in results.items():
        points = froc_points(torch.cat(best), torch.cat(fp), n_images=len(test))
        print(f"held-out FROC per scan, {rule}: " + ", ".join(f"{r:g}: {s:.3f}" for r, s in points.items()) + f"; CPM {cpm(points):.3f}")
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
