"""The training system around the detector: steps, optimiser, schedule and what gets logged.

The detector itself (`medrpn.model.LesionDetector`) knows nothing of Lightning; this module wraps
it. Hyperparameters are stored as plain dicts and lists (no pickled classes), so a checkpoint
describes its model without the training config and loads with `weights_only=True`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from medrpn.metrics import DetectionMetrics
from medrpn.model import (
    AnchorConfig,
    BackboneConfig,
    DetectorConfig,
    DetectorOutput,
    RoIConfig,
    RPNConfig,
    build_detector,
)

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to zero over the whole run.

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: optimiser steps of linear warm-up from lr / 100.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100


def _as(cls: type, value: Any) -> Any:
    """Accepts a config as its dataclass or as the dict stored in a checkpoint."""
    return value if isinstance(value, cls) else cls(**(value or {}))


class LesionDetectionModule(L.LightningModule):
    """Trains and evaluates a `LesionDetector`.

    Args:
        class_names: lesion classes in label order (linked from the data module by the CLI).
        backbone, anchors, rpn, roi: detector settings (see `medrpn.model`).
        pixel_mean / pixel_std: input standardisation, applied by the detector.
        cross_class_nms_thresh: one box per lesion across classes (see `DetectorConfig`).
        optim: optimiser and learning-rate schedule.
        froc_iou_threshold: IoU at which a detection hits a lesion in the FROC metrics.
    """

    def __init__(
        self,
        class_names: list[str],
        backbone: BackboneConfig = BackboneConfig(),
        anchors: AnchorConfig = AnchorConfig(),
        rpn: RPNConfig = RPNConfig(),
        roi: RoIConfig = RoIConfig(),
        pixel_mean: float = 0.5,
        pixel_std: float = 0.25,
        cross_class_nms_thresh: float = 0.5,
        optim: OptimConfig = OptimConfig(),
        froc_iou_threshold: float = 0.3,
    ) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.detector_config = DetectorConfig(
            num_classes=len(self.class_names),
            backbone=_as(BackboneConfig, backbone),
            anchors=_as(AnchorConfig, anchors),
            rpn=_as(RPNConfig, rpn),
            roi=_as(RoIConfig, roi),
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            cross_class_nms_thresh=cross_class_nms_thresh,
        )
        self.optim = _as(OptimConfig, optim)
        config = self.detector_config
        self.save_hyperparameters(
            {
                "class_names": self.class_names,
                "backbone": asdict(config.backbone),
                "anchors": asdict(config.anchors),
                "rpn": asdict(config.rpn),
                "roi": asdict(config.roi),
                "pixel_mean": pixel_mean,
                "pixel_std": pixel_std,
                "cross_class_nms_thresh": cross_class_nms_thresh,
                "optim": asdict(self.optim),
                "froc_iou_threshold": froc_iou_threshold,
            },
            logger=False,
        )
        self.model = build_detector(config)
        self.val_metrics = DetectionMetrics(froc_iou_threshold=froc_iou_threshold)
        self.test_metrics = DetectionMetrics(froc_iou_threshold=froc_iou_threshold)

    def forward(self, images: Tensor) -> DetectorOutput:
        """Detections and proposals for a batch of images (eval mode)."""
        return self.model(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        images, targets = batch["images"], batch["targets"]
        if len(images) == 0:  # every file of the batch was unreadable (each already reported)
            return None
        losses = self.model(images, targets).losses
        loss = sum(losses[name] for name in LOSS_NAMES)
        batch_size = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def _evaluate(self, batch: dict[str, Any], metrics: DetectionMetrics) -> None:
        if len(batch["images"]) == 0:
            return
        out = self.model(batch["images"])
        metrics.update(out.detections, batch["targets"], out.proposals)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: DetectionMetrics) -> None:
        values = metrics.compute()
        metrics.reset()
        # nan (nothing to measure, e.g. the sanity check on an image without lesions) is not logged
        self.log_dict(
            {f"{stage}/{k}": v for k, v in values.items() if not math.isnan(float(v))}, prog_bar=False, sync_dist=False
        )

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.optim.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return 0.01 + 0.99 * step / max(warmup, 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
