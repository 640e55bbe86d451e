"""The crop classifier: a small CNN naming what a candidate's patch shows (background or a
lesion class). Plain PyTorch; fast on a CPU at 48 px crops.

Each stage is a 3x3 conv + BatchNorm + ReLU and a 2x2 max-pool, widths doubling (a 48 px crop
ends as 3 x 3 cells that each see most of it); global average pooling and a linear layer give
``num_classes + 1`` logits, index 0 being background.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class CropClassifierConfig:
    """Everything needed to rebuild a crop classifier (stored in its checkpoint).

    Attributes:
        num_classes: lesion classes, background not counted.
        in_channels: image channels of the crops.
        widths: channels of each stage (one 2x pooling per stage).
        pixel_mean / pixel_std: standardisation of the [0, 1] input (the detector's).
        dropout: before the final linear layer.
    """

    num_classes: int
    in_channels: int = 1
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    pixel_mean: float = 0.5
    pixel_std: float = 0.25
    dropout: float = 0.2


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CropClassifier(nn.Module):
    """Crops (N, C, S, S) in [0, 1] -> logits (N, num_classes + 1), background first."""

    def __init__(self, config: CropClassifierConfig) -> None:
        super().__init__()
        if config.num_classes < 1 or not config.widths:
            raise ValueError(f"need at least one class and one stage, got {config}")
        self.config = config
        layers: list[nn.Module] = []
        cin = config.in_channels
        for width in config.widths:
            layers += [*_conv(cin, width), nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(cin, config.num_classes + 1)
        )

    def forward(self, crops: Tensor) -> Tensor:
        x = (crops - self.config.pixel_mean) / self.config.pixel_std
        return self.head(self.features(x))
