"""A timm model as the feature extractor, through its `features_only` interface, under the FPN.

`backbone.name: timm/<model>` (e.g. `timm/efficientnet_b0`, `timm/convnext_atto`) takes any of
timm's hundreds of networks instead of torchvision's four. Stage k is the feature map of stride
2**(k+1), as for the ResNets (`returned_stages: [1, 2, 3, 4]` = strides 4..32); timm builds the
stem for `in_channels` channels itself (and adapts pretrained RGB filters). timm is an optional
dependency (`pip install medrpn[timm]`), imported only when such a backbone is built.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from medrpn.errors import ConfigError

PREFIX = "timm/"


class TimmWithFPN(nn.Module):
    """A timm `features_only` network and an FPN over the stages it returns (torchvision's
    `BackboneWithFPN`, for a body that returns a list): maps "0", "1", ... and "pool" to features."""

    def __init__(self, body: nn.Module, in_channels_list: list[int], out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(self.body(x))))


def build_timm_fpn(name: str, in_channels: int, returned_stages: list[int], fpn_channels: int, pretrained: bool) -> TimmWithFPN:
    """The timm network `name` (without the `timm/` prefix) with an FPN over `returned_stages`."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"backbone.name: timm/{name} needs timm (pip install 'medrpn[timm]')") from None
    if not timm.is_model(name):
        raise ConfigError(f"backbone.name: timm has no model {name!r} (timm.list_models() lists them)")
    try:
        probe = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ConfigError(f"backbone.name: timm/{name} gives no feature maps ({error})") from None
    reductions = probe.feature_info.reduction()
    stages = sorted(returned_stages)
    wanted = [2 ** (k + 1) for k in stages]
    missing = [k for k, r in zip(stages, wanted) if r not in reductions]
    if not stages or missing:
        available = [k for k in range(1, 6) if 2 ** (k + 1) in reductions]
        raise ConfigError(f"backbone.returned_stages: timm/{name} has stages {available} (strides {reductions}), not {missing or stages}")
    indices = [reductions.index(r) for r in wanted]
    if pretrained:
        try:
            body = timm.create_model(name, pretrained=True, features_only=True, in_chans=in_channels, out_indices=indices)
        except (OSError, RuntimeError) as error:  # no network, no cached weights, a damaged download
            raise ConfigError(
                f"backbone.pretrained: the weights of timm/{name} could not be loaded ({error}); "
                f"put them in the Hugging Face cache ({torch.hub.get_dir()} for older timm) or set backbone.pretrained: false"
            ) from None
    else:
        body = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels, out_indices=indices)
    return TimmWithFPN(body, body.feature_info.channels(), fpn_channels)
