"""Ultralytics YOLO (v8 / 11, n / s) from scratch: the one-stage detector users would pick instead.

YOLO is compared as its users run it, not through the shared loop: `model.train` with its own
data pipeline, augmentation (mosaic, HSV, scale, flips), optimiser and schedule, on the same
training images as every other system (the split file's `train` list; the labels are the YOLO
`.txt` files beside the images) at the same input size, for the same wall-clock (`time=`) or epoch
budget. Only `pretrained=False` (no weights can be downloaded) and `plots=False` differ from its
defaults. Its `best.pt` (chosen by its own validation on the split's `val` list, as medrpn keeps
its best checkpoint by val CPM) is then evaluated by the shared code: the same validation tensors
from medrpn's pipeline, grey repeated to 3 channels, medrpn's metrics; `predict` is the network
plus Ultralytics' NMS at its validation settings (confidence 0.001, IoU 0.7, 100 per image), so the
inference speed is model + NMS on tensors in memory, as for the other systems.

`ultralytics` is AGPL-3.0: it is in the `bench` extra only, never a dependency of medrpn.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bench.detectors.system import System

VARIANTS = {"yolov8n": "yolov8n.yaml", "yolov8s": "yolov8s.yaml", "yolo11n": "yolo11n.yaml", "yolo11s": "yolo11s.yaml"}


def write_yolo_dataset(split: dict[str, list[Any]], class_names: list[str], folder: Path) -> Path:
    """An Ultralytics dataset in `folder`: `images/<split>/` and `labels/<split>/` of links to the
    split's images and the YOLO `.txt` labels beside them, and the dataset YAML.

    Links rather than the original folder, because Ultralytics writes a label cache beside the
    labels it reads: the user's data folder must stay untouched."""
    import yaml

    for name in ("train", "val"):
        images, labels = folder / "images" / name, folder / "labels" / name
        for sub in (images, labels):
            sub.mkdir(parents=True, exist_ok=True)
            for old in sub.iterdir():
                old.unlink()
        for i, record in enumerate(split[name]):
            source = Path(record.image_path).resolve()
            stem = f"{i:06d}_{source.parent.name}_{source.stem}"  # class folders reuse file numbers
            (images / f"{stem}{source.suffix}").symlink_to(source)
            label = source.with_suffix(".txt")
            if label.exists():
                (labels / f"{stem}.txt").symlink_to(label)
    data_yaml = folder / "data.yaml"
    data_yaml.write_text(
        yaml.safe_dump({"path": str(folder.resolve()), "train": "images/train", "val": "images/val", "names": dict(enumerate(class_names))}),
        encoding="utf-8",
    )
    return data_yaml


class YoloDetector:
    """An Ultralytics detection network behind the comparison's `Detector` interface, for
    evaluation only (it is trained by `train_yolo`, so it has no `losses`)."""

    def __init__(self, model: nn.Module, max_det: int = 100, conf: float = 0.001, iou: float = 0.7) -> None:
        self.model = model
        self.max_det, self.conf, self.iou = max_det, conf, iou

    def predict(self, images: Tensor) -> tuple[list[dict[str, Tensor]], None]:
        from ultralytics.utils.nms import non_max_suppression

        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        dtype = next(self.model.parameters()).dtype
        raw = self.model(images.to(dtype))
        kept = non_max_suppression(
            raw, conf_thres=self.conf, iou_thres=self.iou, max_det=self.max_det, max_time_img=3600.0
        )
        return [{"boxes": k[:, :4].float(), "scores": k[:, 4].float(), "labels": k[:, 5].long()} for k in kept], None


def train_yolo(
    variant: str,
    data_yaml: Path,
    image_size: int,
    batch_size: int,
    num_workers: int,
    device: str,
    budget_seconds: float | None,
    budget_epochs: int | None,
    seed: int,
    project: Path,
    log,
) -> tuple[System, dict[str, Any]]:
    """Trains `variant` with Ultralytics' trainer within the budget; the built system and training figures."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    # Ultralytics logs to MLflow on its own; keep its store beside the run, not in the working folder
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(project / 'mlflow.db').resolve()}")
    project.mkdir(parents=True, exist_ok=True)
    from ultralytics import YOLO

    if variant not in VARIANTS:
        raise ValueError(f"unknown YOLO variant {variant!r}; choose from {', '.join(VARIANTS)}")
    yolo = YOLO(VARIANTS[variant])
    settings: dict[str, Any] = {
        "data": str(data_yaml),
        "imgsz": image_size,
        "batch": batch_size,
        "workers": num_workers,
        "device": "cpu" if device == "cpu" else 0,
        "pretrained": False,
        "plots": False,
        "seed": seed,
        "project": str(project),
        "name": variant,
        "exist_ok": True,
        "verbose": False,
        "epochs": budget_epochs or 1000,
    }
    if budget_seconds is not None:
        settings["time"] = budget_seconds / 3600  # hours; overrides epochs, and the schedule fits it
    start = time.perf_counter()
    yolo.train(**settings)
    seconds = time.perf_counter() - start
    trainer = yolo.trainer
    best = Path(trainer.best)
    weights = best if best.exists() else Path(trainer.last)
    network = YOLO(str(weights)).model.float().eval()
    for p in network.parameters():
        p.requires_grad_(True)  # counted as trainable, like the other systems' parameters
    train_size = len(trainer.train_loader.dataset)
    epochs = int(trainer.epoch) + 1  # begun: a time budget can end the last one early
    log(f"{variant}: {epochs} epochs begun in {seconds:.0f} s (including its own validation); evaluating {weights.name}")
    stats = {
        "epochs_completed": epochs,
        "epochs": epochs,
        "images_seen": epochs * train_size,  # an upper bound when the time budget cut the last epoch
        "train_seconds": round(seconds, 2),
        "train_images_per_s": round(epochs * train_size / seconds, 4),
        "train_images_per_s_after_warmup": None,
        "checkpoint": weights.name,
    }
    system = System(
        name=variant,
        detector=YoloDetector(network),
        description=f"Ultralytics {variant} (from {VARIANTS[variant]}, no pretrained weights), its own trainer and augmentation",
        settings={"ultralytics": _version(), "train": {k: v for k, v in settings.items() if k not in ("project", "data")}},
    )
    return system, stats


def _version() -> str:
    import ultralytics

    return ultralytics.__version__
