"""The `LightningDataModule`: annotations in, patient-level splits, loaders of batches out."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from medrpn.data.annotations import read_annotations
from medrpn.data.batch import collate_detection
from medrpn.data.dataset import DetectionDataset
from medrpn.data.splits import split_by_patient
from medrpn.data.transforms import AugmentConfig, build_transform


class LesionDataModule(L.LightningDataModule):
    """Owns the dataset: reads the annotation file, splits it by patient, serves loaders.

    Args:
        annotations: a COCO JSON or CSV annotation file (image paths relative to it).
        class_names: lesion class names in label order; by default taken from the annotations.
        image_size: side of the square network input (longest image side is resized to it).
        val_fraction / test_fraction: share of images (whole patients) held out for each.
        split_seed: seed of the patient shuffle; the same seed gives the same split.
        batch_size: images per batch and process.
        num_workers: DataLoader worker processes.
        augment: training augmentation (validation and test are never augmented).
    """

    def __init__(
        self,
        annotations: str,
        class_names: list[str] | None = None,
        image_size: int = 256,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 2,
        augment: AugmentConfig = AugmentConfig(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.records, self.class_names = read_annotations(Path(annotations), class_names)
        self.splits = split_by_patient(self.records, val_fraction, test_fraction, split_seed)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment

    def dataset(self, split: str) -> DetectionDataset:
        """The dataset of one split ("train", "val" or "test")."""
        augment = self.augment if split == "train" else None
        return DetectionDataset(self.splits[split], build_transform(self.image_size, augment), self.image_size)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
