"""The training system around the crop classifier: loss, augmentation, optimiser, logging.

Candidates are mostly background, so the cross-entropy weighs each class by the inverse of its
frequency in the training crops (`balanced_class_weights`): every class counts as much as the
background in total. Crops are flipped at random (left-right and up-down, each crop on its own):
a lesion's patch means the same mirrored, and the training set is small.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from medrpn.second_stage.classifier import CropClassifier, CropClassifierConfig


def balanced_class_weights(counts: list[int]) -> list[float]:
    """Per label, total / (labels present x its count): weights whose weighted counts are equal;
    0 for a label with no crops."""
    total, present = sum(counts), sum(1 for c in counts if c > 0)
    return [total / (present * c) if c > 0 else 0.0 for c in counts]


def random_flips(crops: Tensor) -> Tensor:
    """Each crop flipped left-right and up-down, each with probability 1/2."""
    for dim in (-1, -2):
        flip = torch.rand(len(crops), device=crops.device) < 0.5
        crops = torch.where(flip[:, None, None, None], crops.flip(dim), crops)
    return crops


class CropClassifierModule(L.LightningModule):
    """Trains a `CropClassifier` on (crop, label) batches.

    Args:
        classifier: the classifier's settings (`CropClassifierConfig` or its dict).
        class_weights: cross-entropy weight per label (background first); None: equal.
        lr, weight_decay: of AdamW; the learning rate decays to 0 along a cosine over the run.
        flips: random flips of the training crops.
    """

    def __init__(
        self,
        classifier: CropClassifierConfig | dict[str, Any],
        class_weights: list[float] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        flips: bool = True,
    ) -> None:
        super().__init__()
        config = classifier if isinstance(classifier, CropClassifierConfig) else CropClassifierConfig(**classifier)
        self.save_hyperparameters(
            {"classifier": asdict(config), "class_weights": class_weights, "lr": lr, "weight_decay": weight_decay, "flips": flips},
            logger=False,
        )
        self.classifier = CropClassifier(config)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)

    def loss(self, crops: Tensor, labels: Tensor) -> Tensor:
        """Weighted cross-entropy of the classifier on these crops."""
        return F.cross_entropy(self.classifier(crops.float()), labels, weight=self.class_weights)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        crops, labels = batch
        crops = crops.float()
        if self.hparams.flips:
            crops = random_flips(crops)
        loss = self.loss(crops, labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        crops, labels = batch
        logits = self.classifier(crops.float())
        loss = F.cross_entropy(logits, labels, weight=self.class_weights)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log_dict({"val/loss": loss, "val/accuracy": accuracy}, on_epoch=True, prog_bar=True, batch_size=len(labels))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
