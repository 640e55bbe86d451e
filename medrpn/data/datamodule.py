"""The `LightningDataModule`: annotations in, patient-level splits, checked and cached images, loaders out.

Images and volumes take the same road: annotations with 3D boxes (`csv3d`, `luna16`, `masks`)
make a module of volumes (`spatial_dims` 3), whose scans are read into memory at setup
(`medrpn.data.volume_loading`), trained on patches (`patches`) and evaluated whole, one scan per
batch.

Bad input follows the `on_error` policy, always before the first training step:
- ``skip``: every problem (bad annotation row, unknown class, box outside its image, missing or
  unreadable image) is logged, the image it touches is left out, and the list is written to
  ``data_problems.csv`` in the trainer's folder (or the working directory);
- ``fail``: the first problem stops the run with a message naming the file (and row).
Annotation problems are found when the module is built, image problems in `setup` while the
images are decoded into the cache (`medrpn.data.cache`). Should a file still fail later, the
dataset skips it and goes on: an epoch never dies on data.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from medrpn.data.annotations import read_annotations
from medrpn.data.batch import collate_detection
from medrpn.data.cache import CacheConfig, ImageCache
from medrpn.data.dataset import DetectionDataset
from medrpn.data.formats.common import check_box
from medrpn.data.fusion import FusionConfig
from medrpn.data.io import ReadConfig
from medrpn.data.mask_boxes import MaskConfig
from medrpn.data.problems import Problems
from medrpn.data.records import Record
from medrpn.data.sampling import WeightedEpochSampler, check_sampler, sampling_weights
from medrpn.data.splits import SPLITS, SplitConfig, group_keys, kfold_by_patient, read_split_file, split_by_patient
from medrpn.data.transforms import MOSAIC_PARTNERS, AugmentConfig, build_transform
from medrpn.data.resampling import check_target_spacing
from medrpn.data.volume_cache import VolumeDiskCache
from medrpn.data.volume_loading import EpochPatchSampler, PatchConfig, TrainingPatches, VolumeStore, WholeVolumes
from medrpn.data.volume_patches import VolumePatches
from medrpn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REPORT_NAME = "data_problems.csv"


def _as(cls: type, value: Any) -> Any:
    """Accept a settings dataclass, or the plain dict stored in a checkpoint or a YAML file."""
    return value if isinstance(value, cls) else cls(**(value or {}))


class LesionDataModule(L.LightningDataModule):
    """Owns the dataset: reads the annotations, splits them by patient, checks and caches images, serves loaders.

    Args:
        annotations: the annotation file (COCO/MONAI JSON, CSV, VinDr/RSNA/NIH CSV) or YOLO
            folder/data.yaml; image paths are relative to it (see `medrpn.data.annotations`).
        class_names: lesion class names in label order; by default taken from the annotations.
        image_size: side of the square network input (longest image side is resized to it).
        val_fraction / test_fraction: share of images (whole patients) held out for each.
        split_seed: seed of the patient shuffle; the same seed gives the same split.
        batch_size: images per batch and process.
        num_workers: DataLoader worker processes (also used to fill the cache).
        augment: training augmentation (validation and test are never augmented).
        format: annotation format (see `medrpn.data.annotations.FORMATS`); None detects it.
        image_dir: image folder for formats that name images by id (vindr, rsna, nih).
        fusion: how VinDr-CXR's readers are fused (`medrpn.data.fusion`).
        masks: how lesion masks (format "masks") become boxes: the least lesion size in voxels
            and the connectivity (`medrpn.data.mask_boxes`).
        read: how image files become arrays: window, channels, NIfTI axis, default spacing.
        split: patient grouping rule, stratification and k-fold settings, or a split file
            that fixes the split (`medrpn.data.splits`).
        cache: where decoded images are kept ("memory", "disk" or "none"); volumes: "memory" or
            "disk" (memory-mapped, for scans that do not fit in memory together).
        on_error: "skip" (leave bad images out, with a written report) or "fail" (stop at the first).
        sampler: how an epoch draws training images: "random" (each once, shuffled), "balanced"
            (images with and without lesions equally often) or "patient" (every patient equally
            often); see `medrpn.data.sampling`. All of them shard over DDP ranks.
        patches: how training patches are cut from volumes (3D annotations only; `image_size`,
            `augment`, `read`, `cache` and `sampler` are for images).
        sequences: volumes only: file (or DICOM series folder) names of co-registered sequences
            beside each annotated scan, e.g. [FLAIR.nii.gz, T1.nii.gz, T2.nii.gz], read as the
            input channels in this order (`model.volume.backbone.in_channels` must be as many);
            each must lie on the annotated scan's grid. None: the annotated scan alone.
        target_spacing: volumes only: resample every scan to these voxel sizes in mm (x, y, z),
            e.g. the dataset's median spacing (`medrpn.data.resampling`); boxes follow, and
            `predict` maps the findings back to the scan's own voxels. None: each scan as it is.

    Attributes:
        spatial_dims: 2 (images) or 3 (volumes), from the annotations; linked to the model.
        in_channels: input channels of a volume (the sequences, else 1).
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
        format: str | None = None,
        image_dir: str | None = None,
        fusion: FusionConfig = FusionConfig(),
        read: ReadConfig = ReadConfig(),
        split: SplitConfig = SplitConfig(),
        cache: CacheConfig = CacheConfig(),
        on_error: str = "skip",
        sampler: str = "random",
        patches: PatchConfig = PatchConfig(),
        sequences: list[str] | None = None,
        target_spacing: list[float] | None = None,
        masks: MaskConfig = MaskConfig(),
    ) -> None:
        super().__init__()
        check_sampler(sampler)
        self.sampler = sampler
        self.augment = _as(AugmentConfig, augment)
        self.fusion = _as(FusionConfig, fusion)
        self.masks = _as(MaskConfig, masks)
        self.read = ReadConfig.parse(read)
        self.split = _as(SplitConfig, split)
        self.cache_config = _as(CacheConfig, cache)
        self.patches = _as(PatchConfig, patches)
        self.problems = Problems(on_error)
        self.save_hyperparameters(
            {
                "annotations": str(annotations),
                "class_names": class_names,
                "image_size": image_size,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "split_seed": split_seed,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "augment": asdict(self.augment),
                "format": format,
                "image_dir": image_dir,
                "fusion": asdict(self.fusion),
                "read": self.read.as_dict(),
                "split": asdict(self.split),
                "cache": asdict(self.cache_config),
                "on_error": on_error,
                "sampler": sampler,
                "patches": asdict(self.patches),
                "sequences": None if sequences is None else list(sequences),
                "target_spacing": None if target_spacing is None else list(target_spacing),
                "masks": asdict(self.masks),
            },
            logger=False,
        )
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.records, self.class_names = read_annotations(
            Path(annotations), class_names, format, self.problems, image_dir, self.fusion, self.read, self.masks
        )
        self.spatial_dims = self._spatial_dims(self.records, annotations)
        keys = group_keys(self.records, self.split.group_blocks, max_decoded_bytes=self.read.max_decoded_bytes)
        self.groups = dict(zip((r.key for r in self.records), keys))
        self.splits = self._split(self.records)
        self.images = ImageCache(self.cache_config, self.read, image_size)
        self.target_spacing = check_target_spacing(target_spacing)
        if self.target_spacing is not None and self.spatial_dims != 3:
            raise ConfigError("data.target_spacing resamples volumes; for images, data.image_size sets the input size")
        disk = None
        if self.spatial_dims == 3 and self.cache_config.mode == "disk":
            disk = VolumeDiskCache(self.cache_config.dir)
        elif self.spatial_dims == 3 and self.cache_config.mode == "none":
            raise ConfigError('data.cache.mode "none" reads images again at every step; volumes are kept in "memory" or on "disk"')
        self.volumes = VolumeStore(sequences, self.target_spacing, disk)
        self.in_channels = len(sequences) if sequences else 1
        self._checked = False

    @staticmethod
    def _spatial_dims(records: list[Record], annotations: str) -> int:
        dims = {r.spatial_dims for r in records}
        if len(dims) > 1:
            raise DataError(Path(annotations), "mixes 2D boxes (images) and 3D boxes (volumes); use one kind per dataset")
        return dims.pop() if dims else 2

    @property
    def validation_by_choice_none(self) -> bool:
        """No validation split because the user asked for none (`val_fraction: 0`, or a split file
        with no "val" images), as with too few patients to hold one out: training then runs the
        set schedule and the last weights are the model (no best epoch, no operating point)."""
        if self.splits["val"]:
            return False
        return self.split.file is not None or (self.hparams.val_fraction == 0 and self.split.num_folds is None)

    def _split(self, records: list[Record]) -> dict[str, list[Record]]:
        hp = self.hparams
        if self.split.file is not None:
            return read_split_file(self.split.file, records, self.problems.images)
        groups = [self.groups[r.key] for r in records]
        stratify = self.split.stratify
        if self.split.num_folds is None:
            return split_by_patient(
                records, hp.val_fraction, hp.test_fraction, hp.split_seed, groups, stratify, ordered=self.split.ordered
            )
        held = split_by_patient(records, 0.0, hp.test_fraction, hp.split_seed, groups, stratify)
        rest = held["train"]
        folds = kfold_by_patient(rest, self.split.num_folds, hp.split_seed, [self.groups[r.key] for r in rest], stratify)
        val = folds[self.split.fold]
        train = [r for i, fold in enumerate(folds) if i != self.split.fold for r in fold]
        return {"train": train, "val": val, "test": held["test"]}

    def check_images(self, keep: bool = True) -> None:
        """Decode (or, with cache "none", probe) every image once and check its boxes against its size.

        Under "skip" the images with a problem leave their split; under "fail" the first problem raises.
        Runs once, from `setup`, before the first step. `keep=False` checks without keeping the
        decoded pixels in memory (for `medrpn check-data`).
        """
        if self._checked:
            return
        records = [r for name in SPLITS for r in self.splits[name]]
        if self.spatial_dims == 3:
            self._check_volumes(records)
            return
        estimate = len(records) * self.image_size**2 * 2 * self.read.channels / 2**20
        if self.cache_config.mode == "memory" and keep:
            log.info("Caching %d images in memory (about %.0f MiB)", len(records), estimate)

        def unreadable(record: Record, error: DataError) -> None:
            kind = "missing_image" if error.reason == "file not found" else "unreadable_image"
            self.problems.add(kind, error, record.key)

        self.images.fill(records, self.num_workers, unreadable, keep)
        for record in records:
            size = self.images.sizes.get(record.key)
            if size is None:
                continue
            for box, row in zip(record.boxes, record.box_rows):
                source = record.source or record.image_path
                check_box(box, source, None if row < 0 else int(row), self.problems, record.key, size)
        bad = self.problems.images
        self.splits = {name: [r for r in part if r.key not in bad] for name, part in self.splits.items()}
        self._checked = True

    def _check_volumes(self, records: list[Record]) -> None:
        """Reads every scan once into memory or the disk cache (`VolumeStore`); an unreadable one leaves its split."""
        log.info("Reading %d volumes", len(records))

        def unreadable(record: Record, error: DataError) -> None:
            kind = "missing_image" if error.reason == "file not found" else "unreadable_image"
            self.problems.add(kind, error, record.key)

        self.volumes.fill(records, unreadable)
        if self.volumes.disk is not None:
            log.info("Volumes on disk under %s, memory-mapped", self.volumes.disk.folder)
        else:
            log.info("Volumes in memory: %.0f MiB", self.volumes.nbytes / 2**20)
        bad = self.problems.images
        self.splits = {name: [self.volumes.on_grid(r) for r in part if r.key not in bad] for name, part in self.splits.items()}
        self._checked = True

    def _report_dir(self) -> Path:
        trainer = self.trainer  # None outside a Trainer
        root = getattr(trainer, "default_root_dir", None) if trainer is not None else None
        return Path(root) if root else Path.cwd()

    def setup(self, stage: str | None = None) -> None:
        """Check every image before the first step; under "skip", write the list of what was left out."""
        if self._checked:
            return
        self.check_images()
        trainer = self.trainer  # None outside a Trainer
        if len(self.problems) and (trainer is None or trainer.is_global_zero):
            report = self.problems.write_report(self._report_dir() / REPORT_NAME)
            log.warning(
                "%d data problem(s); %d image(s) left out of training (on_error: skip). The list: %s",
                len(self.problems),
                len(self.problems.images),
                report,
            )

    def dataset(self, split: str) -> DetectionDataset:
        """The dataset of one split ("train", "val" or "test")."""
        augment = self.augment if split == "train" else None
        partners = MOSAIC_PARTNERS if augment is not None and augment.mosaic > 0 else 0
        return DetectionDataset(
            self.splits[split], build_transform(self.image_size, augment), self.image_size, self.images, partners
        )

    def _volume_loader(self, split: str) -> DataLoader:
        """Patches for training; whole scans, one per batch, for evaluation."""
        if split != "train":
            dataset = WholeVolumes(self.splits[split], self.volumes)
            return DataLoader(dataset, batch_size=1, num_workers=0, collate_fn=collate_detection)
        p = self.patches
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # seed_everything's, equal on every rank
        patches = VolumePatches(
            self.splits["train"], tuple(p.size), p.positive_fraction, p.per_volume, p.flip, seed, self.volumes.arrays,
            min_visible=p.min_visible, negatives=p.negatives,
        )
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return DataLoader(
            TrainingPatches(patches),
            batch_size=self.batch_size,
            sampler=EpochPatchSampler(len(patches), seed, replicas, rank),
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            persistent_workers=self.num_workers > 0,
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.spatial_dims == 3:
            return self._volume_loader(split)
        dataset = self.dataset(split)
        sampler = self._weighted_sampler(dataset) if split == "train" and self.sampler != "random" else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_detection,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def _weighted_sampler(self, dataset: DetectionDataset) -> WeightedEpochSampler:
        records = self.splits["train"]
        weights = sampling_weights(records, self.sampler, [self.groups[r.key] for r in records])
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # seed_everything's, equal on every rank
        return WeightedEpochSampler(dataset, weights, num_replicas=replicas, rank=rank, seed=seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
