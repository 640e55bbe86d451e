"""Measurements: accuracy with medrpn's own metrics, inference speed, peak memory, the machine.

Accuracy is `medrpn.metrics.detection.DetectionMetrics` over the validation split, exactly as
`medrpn fit` validates: FROC sensitivity at 0.5 / 1 / 2 false positives per image, CPM, mAP at
IoU 0.5 and, for two-stage systems, RPN proposal recall of the top 100 proposals at IoU 0.5.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from bench.detectors.data import to_device
from bench.detectors.system import Detector
from medrpn.data.batch import collate_detection
from medrpn.metrics.detection import DetectionMetrics

# results.json key -> DetectionMetrics scalar
ACCURACY_KEYS = {
    "froc_0.5fp": "froc_0.5fp",
    "froc_1fp": "froc_1fp",
    "froc_2fp": "froc_2fp",
    "cpm": "cpm",
    "cpm_iou50": "cpm_iou50",
    "map50": "map50",
    "map50_95": "map50_95",
    "rpn_recall100": "rpn_recall100",
}


def _clean(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


@torch.inference_mode()
def evaluate(
    detector: Detector, val_loader: DataLoader, device: torch.device, class_names: list[str], **metric_settings: Any
) -> dict[str, Any]:
    """The accuracy figures over every image of `val_loader`, plus the per-class CPM.

    `metric_settings` go to `DetectionMetrics` (the recipe's `froc_hit_rule`, `froc_iou_threshold`)."""
    model = detector.model
    model.eval()
    metrics = DetectionMetrics(class_names=class_names, **metric_settings)
    n_images = 0
    for batch in val_loader:
        if len(batch["images"]) == 0:
            continue
        images, targets, _ = to_device(batch, device)
        detections, proposals = detector.predict(images)
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        metrics.update(
            [cpu(d) for d in detections],
            [cpu(t) for t in targets],
            None if proposals is None else [p.detach().cpu() for p in proposals],
            batch["meta"],
        )
        n_images += len(images)
    scalars = metrics.report().scalars
    out: dict[str, Any] = {key: _clean(scalars.get(name, math.nan)) for key, name in ACCURACY_KEYS.items()}
    out["cpm_per_class"] = {c: _clean(scalars.get(f"{c}/cpm", math.nan)) for c in class_names}
    out["map50_per_class"] = {c: _clean(scalars.get(f"{c}/map50", math.nan)) for c in class_names}
    out["val_images"] = n_images
    return out


@torch.inference_mode()
def inference_speed(
    detector: Detector, dataset: Dataset, device: torch.device, n_images: int = 64, batch_sizes: tuple[int, ...] = (1, 8)
) -> dict[str, Any]:
    """Images per second of `predict` (detections and proposals) on the first `n_images` of
    `dataset`, per batch size, after one warm-up batch; the images are in memory beforehand."""
    model = detector.model
    model.eval()
    samples = [s for s in (dataset[i] for i in range(min(n_images, len(dataset)))) if s is not None]
    out: dict[str, Any] = {"infer_images": len(samples)}
    for size in batch_sizes:
        batches = [collate_detection(samples[i : i + size])["images"].to(device) for i in range(0, len(samples), size)]
        if not batches:
            out[f"infer_images_per_s_b{size}"] = None
            continue
        detector.predict(batches[0])  # warm-up (allocators, kernels, anchors)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for images in batches:
            detector.predict(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        out[f"infer_images_per_s_b{size}"] = round(len(samples) / seconds, 3) if seconds > 0 else None
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak memory allocated by torch on the GPU, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import monai
    import torchvision

    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "monai": monai.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
    }
    return info
