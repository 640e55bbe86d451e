"""Findings for new images: read, detect with a trained checkpoint, write JSON and overlays.

The checkpoint carries everything needed (classes, detector settings, input size), so no training
config is required. Files that cannot be read are listed with the reason and skipped; the run
goes on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import clip_boxes_to_image

from medrpn import __version__
from medrpn.data.io import read_image
from medrpn.data.transforms import build_transform, fit_scale
from medrpn.errors import DataError, MedrpnError
from medrpn.outputs import make_findings, write_findings_json, write_overlay_png
from medrpn.training import LesionDetectionModule

IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ""}


@dataclass
class PredictReport:
    """What a prediction run did: files written, images without findings, files skipped."""

    written: list[Path] = field(default_factory=list)
    findings: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_checkpoint(path: str | Path) -> tuple[LesionDetectionModule, dict[str, Any]]:
    """The trained module (eval mode, CPU) and the data settings it was trained with.

    Loaded with `weights_only=True`: a checkpoint can carry tensors and plain data, never code.
    """
    path = Path(path)
    if not path.is_file():
        raise MedrpnError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused or a damaged file
        raise MedrpnError(f"{path}: not a loadable medrpn checkpoint ({error.__class__.__name__}: {error})") from None
    if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise MedrpnError(f"{path}: not a medrpn checkpoint (no hyper_parameters/state_dict)")
    module = LesionDetectionModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval(), dict(checkpoint.get("datamodule_hyper_parameters", {}))


def find_images(root: Path) -> list[Path]:
    """`root` itself if it is a file, else the image files below it (sorted, hidden files skipped)."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise MedrpnError(f"{root}: no such file or folder")
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def predict_files(
    ckpt: str | Path,
    inputs: str | Path,
    output: str | Path,
    score_threshold: float = 0.5,
    batch_size: int = 4,
) -> PredictReport:
    """Writes `<name>.json` (findings) and `<name>.png` (overlay) under `output` for every image.

    The folder structure below `inputs` is mirrored in `output`, so equal file names in
    different folders do not collide.
    """
    ckpt, inputs, output = Path(ckpt), Path(inputs), Path(output)
    module, data_settings = load_checkpoint(ckpt)
    image_size = int(data_settings.get("image_size", 256))
    transform = build_transform(image_size)
    model_info = {
        "name": "medrpn",
        "version": __version__,
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_sha256": _sha256(ckpt),
        "score_threshold": score_threshold,
    }
    paths = find_images(inputs)
    root = inputs if inputs.is_dir() else inputs.parent
    report = PredictReport()
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start : start + batch_size]:
            try:
                batch.append((path, read_image(path)))
            except DataError as error:
                report.skipped.append((str(path), error.reason))
                print(f"skipped {path}: {error.reason}", flush=True)
        if not batch:
            continue
        tensors = [transform(image=image.array, bboxes=np.zeros((0, 4)), labels=[])["image"] for _, image in batch]
        with torch.inference_mode():
            out = module(torch.from_numpy(np.stack(tensors)[:, None].astype(np.float32)))
        for (path, image), detection in zip(batch, out.detections):
            # back to original pixels; the padding added to square the image holds no findings
            boxes = clip_boxes_to_image(detection["boxes"] / fit_scale(*image.array.shape, image_size), image.array.shape)
            keep = (detection["scores"] >= score_threshold) & (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            findings = make_findings(
                boxes[keep].numpy(),
                detection["scores"][keep].numpy(),
                detection["labels"][keep].numpy(),
                module.class_names,
                image.spacing,
            )
            stem = output / path.relative_to(root).with_suffix("")
            stem.parent.mkdir(parents=True, exist_ok=True)
            report.written.append(
                write_findings_json(
                    stem.with_suffix(".json"),
                    source=str(path),
                    image_size=image.array.shape,
                    spacing=image.spacing,
                    findings=findings,
                    image_meta=image.meta,
                    model=model_info,
                )
            )
            write_overlay_png(stem.with_suffix(".png"), image.array, findings, module.class_names)
            report.findings += len(findings)
    print(
        f"medrpn predict: {len(report.written)} images, {report.findings} findings with score >= {score_threshold}, "
        f"{len(report.skipped)} files skipped; written to {output.resolve()}",
        flush=True,
    )
    return report
