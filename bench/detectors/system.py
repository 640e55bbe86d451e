"""The interface every compared detector is wrapped in, so that one loop trains and evaluates them all.

Inputs follow medrpn's batch contract (`medrpn.data.batch`): images (B, C, H, W) in [0, 1], targets
with absolute pixel xyxy `boxes` and 0-based `labels`. Outputs follow it too: detections per image
{"boxes", "scores", "labels"} (0-based) and, for two-stage detectors, RPN proposals per image
(P, 4), best first. Each wrapper converts to and from its library's own conventions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn


class Detector(Protocol):
    """What the shared loop needs of a system."""

    model: nn.Module

    def losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The training losses of a batch (the model is in train mode)."""
        ...

    def predict(self, images: Tensor) -> tuple[list[dict[str, Tensor]], list[Tensor] | None]:
        """Detections and (two-stage only, else None) proposals of a batch (eval mode, no grad)."""
        ...


@dataclass
class System:
    """A built system: the detector and a description for the report.

    Attributes:
        name: the name used on the command line and in the results.
        detector: the wrapped model.
        description: one line: library, architecture, backbone.
        settings: what differs from the library's defaults, and the anchors (for the report).
    """

    name: str
    detector: Detector
    description: str
    settings: dict[str, Any] = field(default_factory=dict)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
