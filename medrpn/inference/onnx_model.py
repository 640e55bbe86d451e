"""An exported ONNX detector (`medrpn.inference.onnx_export`) run with ONNX Runtime, in the place
of the PyTorch model: `medrpn predict --ckpt model.onnx` and `medrpn serve` take it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medrpn.errors import ConfigError
from medrpn.inference.onnx_export import FORMAT, METADATA_KEY, OUTPUTS
from medrpn.model.box_ops import suppress_contained
from medrpn.model.detector import DetectorOutput


def is_onnx(path: str | Path) -> bool:
    """Whether ``path`` names an exported model (by its suffix)."""
    return Path(path).suffix.lower() == ".onnx"


class OnnxDetector:
    """Called like the PyTorch detector on a batch (B, C, N, N) in eval mode; runs the ONNX graph
    once per image, then the steps the graph leaves out (the containment step)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such file")
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError(f"{path}: running an ONNX model needs onnxruntime (pip install 'medrpn[onnx]')") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's errors are its own classes
            raise ConfigError(f"{path}: not an ONNX model ONNX Runtime can load ({type(error).__name__})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        metadata = json.loads(raw) if raw else {}
        if metadata.get("format") != FORMAT:
            raise ConfigError(f"{path}: not exported by `medrpn export` (no '{METADATA_KEY}' metadata of format {FORMAT})")
        self.metadata: dict[str, Any] = metadata
        self.class_names: list[str] = list(metadata["class_names"])
        self.containment_thresh: float | None = metadata.get("containment_thresh")

    def __call__(self, images: Tensor) -> DetectorOutput:
        out = DetectorOutput()
        for image in images:
            boxes, scores, labels, proposals, proposal_scores = (
                torch.from_numpy(a) for a in self.session.run(list(OUTPUTS), {"images": image[None].numpy()})
            )
            if self.containment_thresh is not None and len(boxes) > 1:
                keep = suppress_contained(boxes, scores, self.containment_thresh)
                boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            out.detections.append({"boxes": boxes, "scores": scores, "labels": labels})
            out.proposals.append(proposals)
            out.proposal_scores.append(proposal_scores)
        return out
