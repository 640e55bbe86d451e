"""`medrpn export`: a trained 2D detector as an ONNX model that runs in ONNX Runtime alone.

The graph is the whole detector for one image: backbone, FPN, RPN (anchors, decoding, NMS), RoI
Align, the second stage and its per-class and cross-class NMS, traced by torch's TorchScript-based
ONNX exporter at opset 17 (torchvision's NMS and RoI Align have ONNX forms there). What the graph
needs and gives is written into the model's metadata (key ``medrpn``, JSON; `export_metadata`), so
a user without medrpn can feed it and read its outputs:

* input ``images``: float32 (1, C, N, N), the image read as the training data was (the ``read``
  settings: modality LUT, window, photometric inversion) scaled to [0, 1], resized so that its
  longer side is N (OpenCV INTER_AREA) and padded with zeros at the bottom and right to N x N;
  the graph standardises it itself;
* outputs ``boxes`` (D, 4) x1, y1, x2, y2 in the N x N input's pixels (divide by the resize factor
  N / max(height, width) for the image's own), ``scores`` (D,), ``labels`` (D,) int64 indices into
  ``class_names``, best first, before the score threshold; ``proposals`` (P, 4) and
  ``proposal_scores`` (P,) of the RPN;
* what comes after: findings are the detections scoring at least ``operating_point.score_threshold``;
  with ``containment_thresh`` set, a detection nested in a better one is dropped first
  (`medrpn.model.box_ops.suppress_contained`: a loop over the detections, which a traced graph
  cannot hold, so it runs outside it).

Before the file is written, the ONNX model and the PyTorch model are run on the same inputs and
must agree (`PARITY`): an export that would change the findings is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medrpn import __version__
from medrpn.errors import ConfigError, MedrpnError
from medrpn.inference.proposal_settings import describe_proposal_settings
from medrpn.outputs.findings import file_sha256

OPSET = 17
METADATA_KEY = "medrpn"
FORMAT = "medrpn-onnx-1"
OUTPUTS = ("boxes", "scores", "labels", "proposals", "proposal_scores")
PARITY = {"boxes_px": 0.01, "scores": 1e-4}
"""Largest difference allowed between ONNX Runtime's and PyTorch's outputs: box corners in input
pixels, scores; the number of detections and their labels must be equal."""


class SingleImageDetector(nn.Module):
    """The detector for one image, returning plain tensors (`OUTPUTS`), without the containment
    step (applied after the graph, see the module docstring)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.detector(images)
        found = out.detections[0]
        return found["boxes"], found["scores"], found["labels"], out.proposals[0], out.proposal_scores[0]


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how closely the exported model matched the PyTorch model."""

    path: Path
    max_box_difference: float
    max_score_difference: float
    detections_compared: int


def export_metadata(module: Any, checkpoint: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """What a user of the ONNX file needs besides the graph (see the module docstring)."""
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    image_size = int(data.get("image_size", 256))
    return {
        "format": FORMAT,
        "medrpn_version": __version__,
        "source_checkpoint_sha256": file_sha256(ckpt),
        "class_names": list(module.class_names),
        "image_size": image_size,
        "input_channels": int(module.detector_config.backbone.in_channels),
        "read": data.get("read") or {},
        "preprocessing": (
            f"read the image as training did ('read'), scale intensities to [0, 1], resize so that the longer side "
            f"is {image_size} (OpenCV INTER_AREA), pad with zeros at the bottom and right to {image_size} x {image_size}; "
            "input float32 (1, C, N, N); the graph standardises it"
        ),
        "outputs": {
            "boxes": "(D, 4) x1 y1 x2 y2 in input pixels; divide by N / max(height, width) for the image's own",
            "scores": "(D,) best first, before the score threshold",
            "labels": "(D,) int64 index into class_names",
            "proposals": "(P, 4) RPN proposals in input pixels", "proposal_scores": "(P,) objectness",
        },
        "containment_thresh": module.model.containment_thresh,
        "operating_point": checkpoint.get("operating_point"),
        "proposal_settings": describe_proposal_settings(module.detector_config.rpn, {}),
    }


def export_onnx(ckpt: str | Path, output: str | Path) -> ExportReport:
    """Export ``ckpt`` (a 2D detector from `medrpn fit`) to ``output`` (.onnx) and check it.

    Raises:
        ConfigError: a 3D or RPN-only checkpoint, or one with test-time flips (not exported yet).
        MedrpnError: the ONNX model does not reproduce the PyTorch model within `PARITY`.
    """
    import onnx  # the export extra: pip install 'medrpn[onnx]'

    from medrpn.training.lightning_module import (
        module_from_checkpoint,
        read_module_checkpoint,
    )

    ckpt, output = Path(ckpt), Path(output)
    checkpoint = read_module_checkpoint(ckpt)
    module = module_from_checkpoint(ckpt, checkpoint=checkpoint).eval()
    if getattr(module, "spatial_dims", 2) == 3:
        raise ConfigError(f"{ckpt}: a 3D model; export takes 2D detectors so far")
    if module.model.rpn_only:
        raise ConfigError(f"{ckpt}: an RPN-only model; export takes full detectors so far")
    if module.model.test_flips:
        raise ConfigError(f"{ckpt}: test-time flips ({', '.join(module.model.test_flips)}) are not exported yet")
    metadata = export_metadata(module, checkpoint, ckpt)
    wrapper = SingleImageDetector(module.model).eval()
    containment, module.model.containment_thresh = module.model.containment_thresh, None
    size, channels = metadata["image_size"], metadata["input_channels"]
    example = parity_inputs(channels, size)[1]  # lesion-like: the graph is traced through detections
    output.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".onnx")
    os.close(descriptor)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on Python conditions it fixes
            torch.onnx.export(
                wrapper, (example,), temporary, opset_version=OPSET, dynamo=False,
                input_names=["images"], output_names=list(OUTPUTS),
                dynamic_axes={name: {0: name.split("_")[0]} for name in OUTPUTS},
            )
        model = onnx.load(temporary)
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.save(model, temporary)
        report = _check_parity(wrapper, Path(temporary), channels, size)
        os.replace(temporary, output)
    finally:
        module.model.containment_thresh = containment
        Path(temporary).unlink(missing_ok=True)
    report.path = output
    return report


def parity_inputs(channels: int, size: int) -> list[Tensor]:
    """Inputs both models must agree on: noise, and bright blobs on a dark ground (lesion-like)."""
    generator = torch.Generator().manual_seed(1)
    noise = torch.rand(1, channels, size, size, generator=generator)
    grid = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    blobs = 0.2 * torch.ones(size, size)
    for cx, cy, r in ((0.3, 0.3, 0.06), (0.7, 0.6, 0.1), (0.5, 0.85, 0.03)):
        blobs += 0.7 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
    return [noise, blobs.clamp(0, 1).expand(1, channels, size, size).contiguous(), torch.zeros(1, channels, size, size)]


def _check_parity(wrapper: nn.Module, path: Path, channels: int, size: int) -> ExportReport:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    box_diff = score_diff = 0.0
    compared = 0
    for images in parity_inputs(channels, size):
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(images)]
        got = session.run(list(OUTPUTS), {"images": images.numpy()})
        if got[0].shape != expected[0].shape or not np.array_equal(got[2], expected[2]):
            raise MedrpnError(
                f"the ONNX model gives {len(got[0])} detections where PyTorch gives {len(expected[0])} "
                "(or other labels): not written"
            )
        if len(got[0]):
            box_diff = max(box_diff, float(np.abs(got[0] - expected[0]).max()))
            score_diff = max(score_diff, float(np.abs(got[1] - expected[1]).max()))
        compared += len(got[0])
    if box_diff > PARITY["boxes_px"] or score_diff > PARITY["scores"]:
        raise MedrpnError(f"the ONNX model differs from PyTorch by {box_diff:.4g} px / {score_diff:.3g} in score: not written")
    return ExportReport(path, box_diff, score_diff, compared)
