"""Backbones from torchvision and timm by name (`tv:resnet50`, `timm:mobilenetv4_conv_small`).

The library builds its plain classifier; we cut it where each resolution level ends (the
points timm's `feature_info` reports, found here by tracing shapes so torchvision models
need no table). The levels at stride 2 stay in the stem; each later level ends a section;
a last pointwise expansion conv (MobileNet's, EfficientNet's) stays with the head, as in the
hand-cut MobileNets. The deepest exit's head is the library model itself with its body
taken out, so its pooling, norms and classifier are the library's own; the build checks that
the cut network computes what the library model computes.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from byot_edge.errors import ByotError
from byot_edge.extras import require
from byot_edge.models.multi_exit import Backbone, ModelConfig, Section

LIBRARIES = ("tv", "timm")
# torchvision's CNN families that are cut and tested (tests/test_library_backbones.py)
TV_FAMILIES = ("resnet", "resnext", "wide_resnet", "mobilenet_v2", "mobilenet_v3",
               "efficientnet", "regnet", "convnext")
# timm's modules whose CNNs are cut and tested; other timm CNNs may work, and are refused
# with the reason when they do not (fewer than two levels, or a forward we cannot split).
TIMM_MODULES = ("resnet", "efficientnet", "mobilenetv3", "regnet", "convnext")
TRACE_SIZE = 64  # pixels: enough for stride-32 levels to keep distinct sizes


def is_library_arch(arch: str) -> bool:
    return arch.partition(":")[0] in LIBRARIES and ":" in arch


def library_names(lib: str, pattern: str = "*") -> list[str]:
    """The `lib:name` spellings `--arch` accepts, filtered by a shell-style pattern."""
    if lib == "tv":
        import torchvision

        names = [n for n in torchvision.models.list_models(module=torchvision.models)
                 if n.startswith(TV_FAMILIES)]
    else:
        timm = require("timm", "for timm backbones (--arch timm:NAME)")
        names = sorted({n for m in TIMM_MODULES for n in timm.list_models(module=m)})
    return [f"{lib}:{n}" for n in names if fnmatch.fnmatch(n, pattern)]


def plain_model(arch: str, num_classes: int, in_chans: int, *,
                pretrained: bool = False) -> nn.Module:
    """The library's own classifier for `arch`, randomly initialised (or timm's pretrained
    one, which timm downloads: `models.pretrained` handles the weights otherwise)."""
    lib, _, name = arch.partition(":")
    if lib == "tv":
        import torchvision

        if f"tv:{name}" not in library_names("tv"):
            raise ByotError(f"--arch {arch}: not one of torchvision's CNNs that byot-edge cuts "
                            f"({', '.join(TV_FAMILIES)}); `byot-edge models 'tv:*'` lists them")
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if in_chans != 3:
            _replace_first_conv(model, in_chans)
        return model
    timm = require("timm", "for timm backbones (--arch timm:NAME)")
    if name not in timm.list_models():
        close = timm.list_models(f"*{name[:6]}*")[:5]
        raise ByotError(f"--arch {arch}: timm has no model {name!r}"
                        + (f" (close: {', '.join(close)})" if close else "")
                        + "; `byot-edge models 'timm:*'` lists the CNNs")
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                             in_chans=in_chans)


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    # A new first conv for grey or multispectral input; pretrained RGB weights are folded
    # into it on load (models.pretrained), as timm's `in_chans` does.
    path, conv = next((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d))
    parent, _, leaf = path.rpartition(".")
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=conv.bias is not None)
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@dataclass(frozen=True)
class Level:
    """Where one resolution level of a traced body ends: a place for an exit."""

    end: int  # index into the body's module paths
    name: str
    channels: int
    stride: int


def library_backbone(c: ModelConfig) -> Backbone:
    if c.width != 1.0:
        raise ByotError(f"--width {c.width:g}: library backbones keep their own widths; pick a "
                        "smaller model instead (e.g. tv:mobilenet_v3_small)")
    model = plain_model(c.arch, c.num_classes, c.in_chans)
    classifier = _classifier_keys(model, c.arch)
    paths = _body_paths(model, c.arch)
    levels = _levels(model, paths, c.in_chans, c.arch)
    chosen = _chosen(levels, c.extra.get("exits"), c.arch)
    model.eval()
    probe = torch.randn(2, c.in_chans, c.input_size, c.input_size)
    with torch.no_grad():
        expected = model(probe)
    modules = [model.get_submodule(p) for p in paths]
    stem_end = max((lv.end for lv in levels if lv.stride < 4), default=-1)
    stem = _sequence(paths[:stem_end + 1], modules[:stem_end + 1])
    sections, start = [], stem_end + 1
    for lv in chosen:
        module = _sequence(paths[start:lv.end + 1], modules[start:lv.end + 1])
        sections.append(Section(lv.name, module, lv.channels, lv.stride))
        start = lv.end + 1
    source = model.state_dict(keep_vars=True)  # the library's names, before the cut
    _take_out(model, paths)
    head = LibraryHead(model)
    _check_cut(stem, sections, head, probe, expected, c.arch)
    for m in (stem, *(s.module for s in sections), head):
        m.train()
    return Backbone(stem, sections, lambda: head, source=source,
                    classifier=classifier)


class LibraryHead(nn.Module):
    """The deepest exit: the library model without its body. Its feature, the distillation
    target the branches are shaped to, is the pooled output of the last section."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.model(x), feature


def _classifier_keys(model: nn.Module, arch: str) -> frozenset[str]:
    """The library model's classifier: never loaded from weights (its class count is ours)."""
    if arch.startswith("timm:"):
        classifier = model.get_classifier()
    else:
        classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    ids = {id(t) for t in classifier.state_dict(keep_vars=True).values()}
    return frozenset(k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids)


def _body_paths(model: nn.Module, arch: str) -> list[str]:
    """The body's modules in forward order, as dotted paths into `model`."""
    if arch.startswith("tv:"):
        paths = []
        for name, child in model.named_children():
            if name in ("avgpool", "classifier", "fc"):
                break
            if name in ("features", "trunk_output"):
                paths += [f"{name}.{n}" for n, _ in child.named_children()]
            else:
                paths.append(name)
    else:
        info = getattr(model, "feature_info", None)
        if not info:
            raise ByotError(f"--arch {arch}: timm reports no stages for it (no feature_info); "
                            "pick a CNN, `byot-edge models 'timm:*'` lists them")
        features = [f["module"] for f in info]
        paths = _expand(model, "", features, features[-1])
    if _is_pointwise_expansion(model.get_submodule(paths[-1])) and len(paths) > 1:
        paths = paths[:-1]  # the head's 1x1 conv: branches shaped to it would cost too much
    return paths


def _expand(module: nn.Module, prefix: str, features: list[str], last: str) -> list[str]:
    # Children in order, opening a child that holds a feature module deeper inside, up to
    # the last feature module (what follows it belongs to the head).
    paths = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if any(f.startswith(path + ".") for f in features):
            paths += _expand(child, path + ".", features, last)
            if last.startswith(path + "."):
                return paths
        else:
            paths.append(path)
            if path == last:
                return paths
    return paths


def _is_pointwise_expansion(module: nn.Module) -> bool:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return (len(convs) == 1 and convs[0].kernel_size == (1, 1) and convs[0].stride == (1, 1)
            and convs[0].out_channels > convs[0].in_channels)


def _levels(model: nn.Module, paths: list[str], in_chans: int, arch: str) -> list[Level]:
    """Trace the body at TRACE_SIZE pixels; a level ends where the next module halves it."""
    model.eval()
    x = torch.zeros(1, in_chans, TRACE_SIZE, TRACE_SIZE)
    shapes = []
    with torch.no_grad():
        for p in paths:
            try:
                x = model.get_submodule(p)(x)
            except (AssertionError, RuntimeError, ValueError) as e:
                first = (str(e).splitlines() or [""])[0][:100]
                raise ByotError(f"--arch {arch}: its body does not run module by module at "
                                f"{TRACE_SIZE} px ({p}: {first}); pick a CNN") from None
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ByotError(f"--arch {arch}: {p} does not give an image-shaped tensor, so it "
                                "cannot be cut into sections; pick a CNN")
            shapes.append(tuple(x.shape[1:]))
    model.train()
    levels = []
    for i, (channels, height, _) in enumerate(shapes):
        if i == len(shapes) - 1 or shapes[i + 1][1] < height:
            levels.append(Level(i, paths[i], channels, round(TRACE_SIZE / height)))
    if sum(lv.stride >= 4 for lv in levels) < 2:
        raise ByotError(f"--arch {arch} has fewer than two resolution levels past the stem, so "
                        "it has no place for a shallow exit; pick a CNN")
    return levels


def _chosen(levels: list[Level], exits: list[str] | None, arch: str) -> list[Level]:
    candidates = [lv for lv in levels if lv.stride >= 4]
    if not exits:
        return candidates
    by_name = {lv.name: lv for lv in candidates}
    unknown = [e for e in exits if e not in by_name]
    if unknown:
        raise ByotError(f"--exits {','.join(unknown)}: not a stage end of {arch}; choose from "
                        f"{','.join(by_name)}")
    chosen = [lv for lv in candidates if lv.name in exits]
    if chosen[-1] is not candidates[-1] or len(chosen) < 2:
        raise ByotError(f"--exits must name at least two stage ends of {arch} and end with the "
                        f"deepest, {candidates[-1].name}; choose from {','.join(by_name)}")
    return chosen


def _sequence(paths: list[str], modules: list[nn.Module]) -> nn.Module:
    # Named after the library's paths ("layer1", "features__3"), so keys stay readable.
    if not modules:
        return nn.Identity()
    return nn.Sequential(OrderedDict((p.replace(".", "__"), m)
                                     for p, m in zip(paths, modules, strict=True)))


def _take_out(model: nn.Module, paths: list[str]) -> None:
    """Remove the body from `model`: a top-level body module becomes Identity; a container
    the body was taken from keeps only what follows (its head part)."""
    taken = set(paths)
    parents = sorted({p.rpartition(".")[0] for p in paths if "." in p}, key=len, reverse=True)
    for parent in parents:
        container = model.get_submodule(parent)
        if not isinstance(container, nn.Sequential):
            raise ByotError(f"cannot cut inside {parent} ({type(container).__name__}): only "
                            "sequential containers can be split into sections")
        rest = OrderedDict((n, m) for n, m in container.named_children()
                           if f"{parent}.{n}" not in taken)
        grand, _, leaf = parent.rpartition(".")
        setattr(model.get_submodule(grand) if grand else model, leaf, nn.Sequential(rest))
        taken.add(parent)
    for p in paths:
        if "." not in p:
            setattr(model, p, nn.Identity())


def _check_cut(stem: nn.Module, sections: list[Section], head: LibraryHead,
               probe: torch.Tensor, expected: torch.Tensor, arch: str) -> None:
    for m in (stem, *(s.module for s in sections), head):
        m.eval()
    with torch.no_grad():
        h = stem(probe)
        for s in sections:
            h = s.module(h)
        got = head(h)[0]
    scale = max(1.0, float(expected.abs().max()))
    if got.shape != expected.shape or float((got - expected).abs().max()) > 1e-4 * scale:
        raise ByotError(f"--arch {arch}: cut into sections it no longer computes what the "
                        "library model computes (its forward does more than run its children "
                        "in order); pick another backbone, or report it")
