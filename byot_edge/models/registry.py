"""Architectures by name: `create_model("resnet18", num_classes=10)`, `list_models()`.

The hand-cut ones are registered here; `tv:NAME` and `timm:NAME` are cut from the library's
own model (`models/library.py`). Both give `MultiExitNet` a `Backbone`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchvision.models.resnet import BasicBlock, Bottleneck

from byot_edge.errors import ByotError
from byot_edge.models.backbones import STEMS, mobilenet_backbone, resnet_backbone
from byot_edge.models.library import is_library_arch, library_backbone
from byot_edge.models.multi_exit import ModelConfig, MultiExitNet

_MODELS: dict[str, Callable[[ModelConfig], MultiExitNet]] = {}  # name -> builder


Builder = Callable[[ModelConfig], MultiExitNet]


def register_model(fn: Builder) -> Builder:
    # A second builder under a taken name would silently replace the first (torchvision's
    # registry refuses it too).
    if fn.__name__ in _MODELS:
        raise ValueError(f"a model named {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    input_size: int = 32,
    stem: str = "cifar",
    width: float = 1.0,
    **extra: Any,
) -> MultiExitNet:
    if is_library_arch(name):
        config = ModelConfig(name, num_classes, in_chans, input_size, stem, width, extra)
        return MultiExitNet(config, library_backbone(config))
    if name not in _MODELS:
        raise ByotError(f"unknown architecture {name!r}; choose one of: "
                        f"{', '.join(list_models())}, or a library backbone such as "
                        "tv:resnet50 (`byot-edge models` lists them)")
    if stem not in STEMS:
        raise ByotError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
    if not 0 < width <= 4:
        raise ByotError(f"width must be in (0, 4], got {width}")
    config = ModelConfig(name, num_classes, in_chans, input_size, stem, width, extra)
    return _MODELS[name](config)


def model_from_config(config: dict[str, Any]) -> MultiExitNet:
    """Rebuild a model from the dict a checkpoint or manifest stores."""
    cfg = dict(config)
    return create_model(cfg.pop("arch"), **{**cfg.pop("extra", {}), **cfg})


def _resnet(block: type, layers: list[int], c: ModelConfig) -> MultiExitNet:
    return MultiExitNet(c, resnet_backbone(block, layers, c))


@register_model
def resnet18(c: ModelConfig) -> MultiExitNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], c)


@register_model
def resnet34(c: ModelConfig) -> MultiExitNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], c)


@register_model
def resnet50(c: ModelConfig) -> MultiExitNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], c)


@register_model
def resnet101(c: ModelConfig) -> MultiExitNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], c)


@register_model
def resnet152(c: ModelConfig) -> MultiExitNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], c)


def _mobilenet(name: str, c: ModelConfig) -> MultiExitNet:
    return MultiExitNet(c, mobilenet_backbone(name, c))


@register_model
def mobilenet_v2(c: ModelConfig) -> MultiExitNet:
    return _mobilenet("mobilenet_v2", c)


@register_model
def mobilenet_v3_small(c: ModelConfig) -> MultiExitNet:
    return _mobilenet("mobilenet_v3_small", c)


@register_model
def mobilenet_v3_large(c: ModelConfig) -> MultiExitNet:
    return _mobilenet("mobilenet_v3_large", c)
