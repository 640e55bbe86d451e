"""The decoupled second stage at inference: crop each candidate, classify the crop, and re-score
and/or re-label the candidate; plus its checkpoint (plain data, loadable with ``weights_only``).

Modes (``SecondStageSettings.mode``):
- ``rescore`` (false-positive reduction): score = the classifier's probability that the crop is
  not background, or with ``combine: geometric`` the geometric mean of that and the detector's
  score (the two stages vote; neither alone decides);
- ``relabel`` (lesion typing): label = the most probable lesion class, score unchanged;
- ``both``.
Proposals carry no class, so with ``candidates: proposals`` the label always comes from the
classifier, and overlapping proposals are thinned by NMS on the new scores (the RoI head, which
would have done it, is bypassed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.ops import nms

from medrpn.training.checkpoint_file import read_checkpoint
from medrpn.errors import ConfigError, MedrpnError
from medrpn.model.detector import DetectorOutput
from medrpn.second_stage.candidates import CANDIDATE_SOURCES, CandidateSource, select_candidates
from medrpn.second_stage.classifier import CropClassifier, CropClassifierConfig
from medrpn.second_stage.crops import crop_patches

MODES: tuple[str, ...] = ("rescore", "relabel", "both")
COMBINES: tuple[str, ...] = ("none", "geometric")
FORMAT = "medrpn-second-stage"
"""Value of the checkpoint's ``format`` key, telling it from a detector checkpoint."""


@dataclass
class SecondStageSettings:
    """How candidates are chosen, cropped and re-scored (stored in the checkpoint).

    Attributes:
        candidates: "detections" (the RoI head's) or "proposals" (the RPN's).
        mode: "rescore", "relabel" or "both" (see the module docstring).
        combine: "none" (score = classifier) or "geometric" (with the detector's score).
        crop_size: side of the classifier's input in pixels.
        margin: context on each side of a box, as a fraction of its longest side.
        min_side: smallest crop window in pixels (of the network input).
        min_score: candidates scoring less are dropped (in training and at inference alike); the
            default is the RoI head's own ``score_thresh``, so every detection is kept.
        nms_thresh: IoU of the NMS on re-scored proposals (unused for detections).
    """

    candidates: CandidateSource = "detections"
    mode: Literal["rescore", "relabel", "both"] = "both"
    combine: Literal["none", "geometric"] = "geometric"
    crop_size: int = 48
    margin: float = 0.5
    min_side: float = 16.0
    min_score: float = 0.01
    nms_thresh: float = 0.5

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("candidates", self.candidates, CANDIDATE_SOURCES), ("mode", self.mode, MODES), ("combine", self.combine, COMBINES)
        ):
            if value not in allowed:
                raise ConfigError(f"second stage {name}: expected one of {', '.join(allowed)}, got {value!r}")
        if self.crop_size < 8 or self.margin < 0 or not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(
                f"second stage: crop_size must be >= 8, margin >= 0 and min_score within [0, 1] "
                f"(got {self.crop_size}, {self.margin}, {self.min_score})"
            )


class SecondStage(nn.Module):
    """A crop classifier applied to a detector's output.

    Args:
        classifier: the trained `CropClassifier`.
        settings: candidates, crops and re-scoring.
        class_names: lesion classes in label order (must be the detector's).
        operating_point: score threshold picked on validation data for the re-scored output
            (``score_threshold``, ``fp_per_image``, ``sensitivity``, ``target_fp_per_image``), or None.
        detector: the detector checkpoint it was trained on (``checkpoint``, ``sha256``), or None.
    """

    def __init__(
        self,
        classifier: CropClassifier,
        settings: SecondStageSettings,
        class_names: list[str],
        operating_point: dict[str, float] | None = None,
        detector: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if classifier.config.num_classes != len(class_names):
            raise ValueError(f"classifier has {classifier.config.num_classes} classes, class_names {len(class_names)}")
        self.classifier = classifier
        self.settings = settings
        self.class_names = list(class_names)
        self.operating_point = operating_point
        self.detector = detector

    def crops(self, images: Tensor, boxes: list[Tensor]) -> Tensor:
        """The classifier's input for these boxes (see `medrpn.second_stage.crops`)."""
        s = self.settings
        return crop_patches(images, boxes, s.crop_size, s.margin, s.min_side)

    @torch.no_grad()
    def forward(self, images: Tensor, output: DetectorOutput) -> list[dict[str, Tensor]]:
        """Re-scored / re-labelled detections (per image ``boxes``, ``scores``, ``labels``, best
        first) for the images the detector produced ``output`` from."""
        s = self.settings
        candidates = select_candidates(output, s.candidates, s.min_score)
        crops = self.crops(images, [c["boxes"] for c in candidates])
        if len(crops):
            probabilities = torch.softmax(self.classifier(crops), dim=1)
        else:
            probabilities = crops.new_zeros((0, len(self.class_names) + 1))
        results = []
        for candidate, p in zip(candidates, probabilities.split([len(c["boxes"]) for c in candidates])):
            boxes, scores, labels = candidate["boxes"], candidate["scores"], candidate["labels"]
            if s.mode in ("rescore", "both"):
                lesion = 1.0 - p[:, 0]
                scores = lesion if s.combine == "none" else torch.sqrt(lesion * scores.clamp(min=0))
            if s.mode in ("relabel", "both") or s.candidates == "proposals":
                labels = p[:, 1:].argmax(dim=1)
            if s.candidates == "proposals":
                keep = nms(boxes, scores, s.nms_thresh)  # best first
            else:
                keep = torch.argsort(scores, descending=True)
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results

    def checkpoint(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything to rebuild it, as plain data and tensors (``torch.load(weights_only=True)``)."""
        return {
            "format": FORMAT,
            "version": 1,
            "class_names": list(self.class_names),
            "settings": asdict(self.settings),
            "classifier": asdict(self.classifier.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.classifier.state_dict().items()},
            "operating_point": None if self.operating_point is None else {k: float(v) for k, v in self.operating_point.items()},
            "detector": None if self.detector is None else {k: str(v) for k, v in self.detector.items()},
            **(extra or {}),
        }


def save_second_stage(stage: SecondStage, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Writes ``stage`` (and ``extra`` plain data, e.g. validation figures) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stage.checkpoint(extra), path)
    return path


def load_second_stage(path: str | Path) -> SecondStage:
    """The second stage saved at ``path`` (eval mode, CPU), loaded with ``weights_only=True``.

    Raises:
        MedrpnError: a missing file, or not a second-stage checkpoint (e.g. a detector's).
    """
    checkpoint = read_checkpoint(path, kind="second-stage checkpoint")
    if checkpoint.get("format") != FORMAT:
        raise MedrpnError(f"{path}: not a second-stage checkpoint (written by `medrpn fit-crops`)")
    try:
        classifier = CropClassifier(CropClassifierConfig(**checkpoint["classifier"]))
        classifier.load_state_dict(checkpoint["state_dict"])
        settings = SecondStageSettings(**checkpoint["settings"])
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise MedrpnError(f"{path}: damaged second-stage checkpoint ({error.__class__.__name__}: {error})") from None
    stage = SecondStage(classifier, settings, checkpoint["class_names"], checkpoint.get("operating_point"), checkpoint.get("detector"))
    return stage.eval()


def check_classes(stage: SecondStage, class_names: list[str], path: str | Path) -> None:
    """Refuses a second stage trained for other classes than the detector's."""
    if list(class_names) != stage.class_names:
        raise ConfigError(
            f"{path}: the second stage was trained for classes {stage.class_names}, the detector has {list(class_names)}"
        )
