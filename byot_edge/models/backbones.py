"""The hand-cut backbones. Each builder returns a `Backbone` (stem, sections, deepest head)
for `MultiExitNet`, as the library builders in `models/library.py` do.

ResNets reuse torchvision's residual blocks with our own widths (torchvision's ResNet has no
width multiplier); MobileNets reuse torchvision's whole feature extractor and cut it where
the resolution halves, since Jetson-class devices are the target.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small
from torchvision.models.resnet import BasicBlock, Bottleneck

from byot_edge.models.branches import DeepestHead
from byot_edge.models.multi_exit import Backbone, ModelConfig, Section

STEMS = ("cifar", "imagenet")


def _scaled(channels: int, width: float) -> int:
    return max(8, round(channels * width / 8) * 8) if width != 1.0 else channels


def resnet_backbone(
    block: type[BasicBlock | Bottleneck], layers: list[int], c: ModelConfig
) -> Backbone:
    in_chans, width = c.in_chans, c.width
    base = _scaled(64, width)
    if c.stem == "cifar":
        stem_module: nn.Module = nn.Sequential(
            nn.Conv2d(in_chans, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU(True)
        )
        stride = 1
    else:
        stem_module = nn.Sequential(
            nn.Conv2d(in_chans, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(True),
            nn.MaxPool2d(3, 2, 1),
        )
        stride = 4
    sections = []
    inplanes = base
    for i, blocks in enumerate(layers):
        planes = _scaled(64 * 2**i, width)
        layer_stride = 1 if i == 0 else 2
        downsample = None
        if layer_stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * block.expansion, 1, layer_stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        modules = [block(inplanes, planes, layer_stride, downsample)]
        inplanes = planes * block.expansion
        modules += [block(inplanes, planes) for _ in range(1, blocks)]
        stride *= layer_stride
        sections.append(Section(f"layer{i + 1}", nn.Sequential(*modules), inplanes, stride))
    _init_resnet(stem_module, sections)
    def head() -> nn.Module:
        return DeepestHead(sections[-1].channels, c.num_classes)

    return Backbone(stem_module, sections, head, rename=_torchvision_resnet_key,
                    classifier=frozenset({"fc.weight", "fc.bias"}))


def _torchvision_resnet_key(key: str) -> str | None:
    """Our ResNet key -> torchvision's ResNet key: the same blocks under other names (the
    imagenet stem at width 1 matches torchvision's weights shape for shape)."""
    first, index, tail = [*key.split(".", 2), "", ""][:3]
    if first == "stem" and index in ("0", "1"):
        return f"{('conv1', 'bn1')[int(index)]}.{tail}"
    if first == "sections":
        return f"layer{int(index) + 1}.{tail}"
    return None  # the exit heads: the branches are new, the classifier is this run's


def _init_resnet(stem: nn.Module, sections: list[Section]) -> None:
    # As torchvision's ResNet: He init, and zero-init the last BN of each residual branch so
    # every block starts as identity (helps the short schedules this toolkit runs on CPUs).
    for m in [*stem.modules(), *(mm for s in sections for mm in s.module.modules())]:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, Bottleneck) and m.bn3.weight is not None:
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
            nn.init.zeros_(m.bn2.weight)


# Indices into torchvision's `features` where each section ends (exclusive), chosen where the
# resolution halves. The final 1x1 expansion conv (features[-1]) belongs to the deepest
# exit's head: shaping the branches to its 1280 (or 576, 960) channels would make the
# shallow exits dearer than the deep one.
_MOBILENET_CUTS = {
    "mobilenet_v2": [4, 7, 14, 18],
    "mobilenet_v3_small": [2, 4, 9, 12],
    "mobilenet_v3_large": [4, 7, 13, 16],
}
_MOBILENET_FACTORIES = {
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
}


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def mobilenet_backbone(name: str, c: ModelConfig) -> Backbone:
    """Cut torchvision's MobileNet; the last 1x1 conv goes to the deepest exit's head."""
    in_chans, stem, width = c.in_chans, c.stem, c.width
    source = _MOBILENET_FACTORIES[name](width_mult=width)
    features = source.features
    first = _first_conv(features[0])
    if in_chans != first.in_channels:
        features[0][0] = nn.Conv2d(in_chans, first.out_channels, 3, first.stride, 1, bias=False)
    if stem == "cifar":
        # Small inputs: keep full resolution through the stem and the first downsampling
        # block (total stride 8 instead of 32), as CIFAR MobileNet variants do.
        _first_conv(features[0]).stride = (1, 1)
        for m in features[1:4].modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
                break
    sections, start, stride = [], 1, 1
    for i, end in enumerate(_MOBILENET_CUTS[name]):
        module = features[start:end]
        stride *= _stride_of(module) * (_stride_of(features[0]) if i == 0 else 1)
        channels = _out_channels(module)
        sections.append(Section(f"features{start}-{end - 1}", module, channels, stride))
        start = end
    def head() -> nn.Module:
        return DeepestHead(sections[-1].channels, c.num_classes, features[-1],
                           _out_channels(features[-1]))

    classifier = frozenset(k for k in source.state_dict() if k.startswith("classifier."))
    return Backbone(features[0], sections, head, source=source.state_dict(keep_vars=True),
                    classifier=classifier)


def _stride_of(module: nn.Module) -> int:
    s = 1
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            s *= m.stride[0]
    return s


def _out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
