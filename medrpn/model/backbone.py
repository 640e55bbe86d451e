"""Feature extractor: a torchvision ResNet, RegNet or MobileNetV3 (or any timm model,
`medrpn.model.timm_backbone`) with a Feature Pyramid Network on top.

Medical images are usually single-channel and are trained from scratch here (weights cannot be
downloaded on every machine), so unlike torchvision's detection defaults:
- the first convolution takes `in_channels` channels (pretrained RGB filters are summed over
  colour when a pretrained stem is adapted to one channel);
- batch norm is trainable when training from scratch (torchvision freezes it, which is only
  right for a pretrained backbone);
- the FPN width is configurable (narrower pyramids are much cheaper on small lesion datasets).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models import (
    mobilenet_v3_large,
    regnet_x_400mf,
    regnet_x_800mf,
    regnet_y_400mf,
    regnet_y_800mf,
    resnet18,
    resnet34,
    resnet50,
)
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from medrpn.errors import ConfigError
from medrpn.model.timm_backbone import PREFIX, build_timm_fpn

_RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
# RegNets (Radosavovic et al., 2020): RegNetX-400MF matches ResNet-18's ImageNet accuracy at about
# a quarter of its operations. In the brain recipe's detector it trained 1.5x and inferred (batch 8)
# 1.5x faster than ResNet-18, but from scratch in the same 40 minutes it found and named fewer
# tumours (CPM 0.727 against 0.830; docs/performance.md): for speed, not the recipe's default.
_REGNETS = {
    "regnet_x_400mf": regnet_x_400mf,
    "regnet_x_800mf": regnet_x_800mf,
    "regnet_y_400mf": regnet_y_400mf,
    "regnet_y_800mf": regnet_y_800mf,
}
_MOBILENETS = {"mobilenet_v3_large": mobilenet_v3_large}
BACKBONES = tuple(_RESNETS) + tuple(_REGNETS) + tuple(_MOBILENETS)


@dataclass
class BackboneConfig:
    """Which network extracts features, and how wide its pyramid is.

    Attributes:
        name: one of resnet18, resnet34, resnet50, regnet_x_400mf, regnet_x_800mf,
            regnet_y_400mf, regnet_y_800mf, mobilenet_v3_large, or `timm/<model>` for a timm
            network (`medrpn.model.timm_backbone`; needs timm installed).
        in_channels: image channels (1 for grey-scale scans).
        fpn_channels: channels of every pyramid level (torchvision uses 256).
        returned_stages: backbone stages that feed the FPN, 1-based. For ResNets stage k has
            stride 2**(k+1) (1 -> stride 4 ... 4 -> stride 32), and for RegNets block k; for
            MobileNetV3 the strided blocks are counted the same way. A max-pooled level (stride
            x2 of the last) is added.
        pretrained: load torchvision's (timm's) ImageNet weights (needs them downloaded or cached).
        trainable_stages: with pretrained torchvision weights, how many stages from the top are
            trained (0..5); ignored when training from scratch, where everything is trained, and
            for timm backbones, which are trained whole.
    """

    name: str = "resnet18"
    in_channels: int = 1
    fpn_channels: int = 128
    returned_stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    pretrained: bool = False
    trainable_stages: int = 3


def build_backbone(config: BackboneConfig) -> nn.Module:
    """Builds the backbone with FPN; its `out_channels` attribute is the pyramid width."""
    if config.name.startswith(PREFIX):
        return build_timm_fpn(
            config.name[len(PREFIX):], config.in_channels, config.returned_stages, config.fpn_channels, config.pretrained
        )
    if config.name in _RESNETS:
        return _resnet_fpn(config)
    if config.name in _REGNETS:
        return _regnet_fpn(config)
    if config.name in _MOBILENETS:
        return _mobilenet_fpn(config)
    raise ConfigError(f"backbone.name: unknown backbone {config.name!r}; choose one of {', '.join(BACKBONES)} or timm/<model>")


def _load(constructor: Callable[..., nn.Module], config: BackboneConfig) -> nn.Module:
    """Builds the torchvision network, with ImageNet weights when asked for.

    Weights come from torchvision (downloaded once into the torch hub cache, `TORCH_HOME`); a
    machine that cannot download them gets a clear error rather than a network traceback.
    """
    if not config.pretrained:
        return constructor(weights=None, norm_layer=nn.BatchNorm2d)
    try:
        return constructor(weights="DEFAULT", norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a damaged download a RuntimeError
        raise ConfigError(
            f"backbone.pretrained: the ImageNet weights of {config.name} could not be loaded ({error}). "
            f"Put them in the torch hub cache ({torch.hub.get_dir()}/checkpoints) or set backbone.pretrained: false"
        ) from None


def _stages(config: BackboneConfig, count: int, family: str) -> list[int]:
    """`returned_stages` sorted, or a clear error when one is outside the network's 1..count."""
    stages = sorted(config.returned_stages)
    if not stages or stages[0] < 1 or stages[-1] > count:
        raise ConfigError(f"backbone.returned_stages must be within 1..{count} for {family}, got {config.returned_stages}")
    return stages


def _adapt_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Returns `conv` taking `in_channels` inputs; pretrained RGB filters are averaged over colour."""
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight) * (3 / in_channels))
    return new


def _resnet_fpn(config: BackboneConfig) -> BackboneWithFPN:
    stages = _stages(config, 4, "ResNets")
    net = _load(_RESNETS[config.name], config)
    net.conv1 = _adapt_stem(net.conv1, config.in_channels)
    if config.pretrained:
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: config.trainable_stages]
        for name, parameter in net.named_parameters():
            parameter.requires_grad_(any(name.startswith(layer) for layer in trainable))
    stage2_channels = net.inplanes // 8
    return BackboneWithFPN(
        net,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(stages)},
        in_channels_list=[stage2_channels * 2 ** (k - 1) for k in stages],
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _regnet_fpn(config: BackboneConfig) -> BackboneWithFPN:
    """A RegNet's stem and four blocks (block k has stride 2**(k+1), as ResNet's layer k) under the FPN."""
    stages = _stages(config, 4, "RegNets")
    net = _load(_REGNETS[config.name], config)
    net.stem[0] = _adapt_stem(net.stem[0], config.in_channels)
    # One flat module, so torchvision's IntermediateLayerGetter can return its blocks.
    body = nn.Sequential(OrderedDict([("stem", net.stem), *net.trunk_output.named_children()]))
    if config.pretrained:
        trainable = ["block4", "block3", "block2", "block1", "stem"][: config.trainable_stages]
        for name, parameter in body.named_parameters():
            parameter.requires_grad_(any(name.startswith(block) for block in trainable))
    widths = [_out_channels(block) for block in net.trunk_output]
    return BackboneWithFPN(
        body,
        return_layers={f"block{k}": str(i) for i, k in enumerate(stages)},
        in_channels_list=[widths[k - 1] for k in stages],
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _out_channels(block: nn.Module) -> int:
    """Channels a RegNet block puts out: those of its last convolution's batch norm."""
    return [m for m in block.modules() if isinstance(m, nn.BatchNorm2d | misc_nn_ops.FrozenBatchNorm2d)][-1].num_features


def _mobilenet_fpn(config: BackboneConfig) -> BackboneWithFPN:
    features = _load(_MOBILENETS[config.name], config).features
    features[0][0] = _adapt_stem(features[0][0], config.in_channels)
    # Blocks that reduce resolution mark the stages (as torchvision's _mobilenet_extractor does).
    strided = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    # Stage k ends just before the (k+1)-th strided block; stage 4 ends at the last block.
    ends = [i - 1 for i in strided[1:]] + [len(features) - 1]
    stages = _stages(config, len(ends), config.name)
    if config.pretrained:
        # Stem = stage 0; freeze everything below the top `trainable_stages` stages.
        frozen_stages = 5 - min(max(config.trainable_stages, 0), 5)
        if frozen_stages > 0:
            last_frozen = 0 if frozen_stages == 1 else ends[frozen_stages - 2]
            for block in features[: last_frozen + 1]:
                block.requires_grad_(False)
    return BackboneWithFPN(
        features,
        return_layers={str(ends[k - 1]): str(i) for i, k in enumerate(stages)},
        in_channels_list=[features[ends[k - 1]].out_channels for k in stages],
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )

