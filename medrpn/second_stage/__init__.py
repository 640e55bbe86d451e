"""A decoupled second stage: a crop classifier that re-scores or re-labels a detector's candidates.

As in LUNA16 pipelines (candidate generation, then false-positive reduction by a separate
network), a trained detector's detections or RPN proposals are cropped with context
(`crops`), labelled by their overlap with the ground truth (`candidates`, `dataset`), and a small
CNN (`classifier`) learns background vs each lesion class (`training`, `medrpn fit-crops` in
`tool`). At inference (`rescoring`) its probabilities re-score (false-positive reduction) and/or
re-label (lesion typing) the candidates; `evaluation` measures the detector with and without it.
The model side (crops, classifier, rescoring) is plain PyTorch.
"""

from medrpn.second_stage.classifier import CropClassifier, CropClassifierConfig
from medrpn.second_stage.crops import context_boxes, crop_patches
from medrpn.second_stage.rescoring import SecondStage, SecondStageSettings, load_second_stage, save_second_stage

__all__ = [
    "CropClassifier",
    "CropClassifierConfig",
    "SecondStage",
    "SecondStageSettings",
    "context_boxes",
    "crop_patches",
    "load_second_stage",
    "save_second_stage",
]
