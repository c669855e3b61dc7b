"""Pretrained weights for a multi-exit network's backbone; the branches always start fresh.

`--pretrained imagenet` fetches the library's ImageNet weights through the library's own
loader (torchvision's weights API into $TORCH_HOME/hub/checkpoints, timm's through the
Hugging Face cache), so their caches and offline settings hold. `--pretrained PATH` takes a
state dict saved from the plain backbone (`torch.save(model.state_dict(), PATH)`), or a
byot-edge checkpoint of the same architecture (its backbone part). Keys are matched through
`MultiExitNet.source_keys`, the map every builder provides; a file that does not fit is
refused in one line that names the keys that differ.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from byot_edge.errors import ByotError
from byot_edge.extras import require
from byot_edge.models.library import is_library_arch, plain_model
from byot_edge.models.multi_exit import MultiExitNet

DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: an offline machine fails, never hangs
SHOWN_KEYS = 4  # keys named per kind of difference in the one-line refusal


@dataclass(frozen=True)
class Pretrained:
    """What was loaded: how many tensors, from where, and the normalisation the weights
    were trained with (None when the source does not say)."""

    source: str
    loaded: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def load_pretrained(net: MultiExitNet, spec: str) -> Pretrained:
    """Fill `net`'s backbone from `spec` ("imagenet" or a path)."""
    if not net.source_keys:
        raise ByotError(f"--pretrained: {net.config.arch} has no map to a plain backbone's "
                        "weights")
    if spec == "imagenet":
        return _imagenet(net)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ByotError(f"--pretrained {spec}: no such file; pass a state dict saved from the "
                        "plain backbone, a byot-edge checkpoint, or `imagenet`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # junk raises anything from EOFError to KeyError inside pickle
        first = (str(e).splitlines() or [""])[0][:120]
        raise ByotError(f"--pretrained {path} is not a readable PyTorch file "
                        f"({type(e).__name__}: {first}); pass a state dict saved with "
                        "torch.save(model.state_dict(), PATH)") from None
    if isinstance(state, dict) and isinstance(state.get("model_config"), dict):
        return _from_checkpoint(net, state, path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training framework's wrapper (Lightning, mmcv)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ByotError(f"--pretrained {path} holds no state dict of tensors; save one with "
                        "torch.save(model.state_dict(), PATH)")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved under DDP
    n = load_state(net, state, str(path))
    return Pretrained(str(path), n)


def load_state(net: MultiExitNet, state: Mapping[str, torch.Tensor], source: str) -> int:
    """Copy a plain backbone's state dict into `net` through its key map; returns the count."""
    wanted = net.source_keys
    ours = net.state_dict()
    missing = [theirs for theirs in wanted.values() if theirs not in state]
    known = set(wanted.values()) | set(net.classifier_keys)
    unexpected = [k for k in state if k not in known]
    shapes = [f"{theirs} {list(state[theirs].shape)} vs {list(ours[k].shape)}"
              for k, theirs in wanted.items()
              if theirs in state and _fitted(state[theirs], ours[k]) is None]
    _refuse_if_different(net, source, missing, shapes, unexpected)
    with torch.no_grad():
        for k, theirs in wanted.items():
            ours[k].copy_(_fitted(state[theirs], ours[k]))
    return len(wanted)


def _from_checkpoint(net: MultiExitNet, state: dict, path: Path) -> Pretrained:
    arch = state["model_config"].get("arch")
    if arch != net.config.arch:
        raise ByotError(f"--pretrained {path} is a byot-edge checkpoint of {arch}, not of "
                        f"{net.config.arch}; train with --arch {arch}, or pass that backbone's "
                        "plain state dict")
    weights, ours = state.get("model", {}), net.state_dict()
    missing = [k for k in net.source_keys if k not in weights]
    shapes = [f"{k} {list(weights[k].shape)} vs {list(ours[k].shape)}"
              for k in net.source_keys if k in weights and weights[k].shape != ours[k].shape]
    _refuse_if_different(net, str(path), missing, shapes, [])
    with torch.no_grad():
        for k in net.source_keys:
            ours[k].copy_(weights[k])
    data = state.get("data", {})
    mean, std = data.get("mean"), data.get("std")
    return Pretrained(str(path), len(net.source_keys), _floats(mean), _floats(std))


def _fitted(theirs: torch.Tensor, ours: torch.Tensor) -> torch.Tensor | None:
    """`theirs` in our shape, or None. An RGB first conv is folded into another channel
    count (summed for grey input, as timm's `in_chans` does)."""
    if theirs.shape == ours.shape:
        return theirs
    if theirs.dim() == 4 and theirs.shape[1] == 3 and theirs.shape[0] == ours.shape[0] \
            and theirs.shape[2:] == ours.shape[2:]:
        c = ours.shape[1]
        if c == 1:
            return theirs.sum(1, keepdim=True)
        return theirs.repeat(1, math.ceil(c / 3), 1, 1)[:, :c] * (3 / c)
    return None


def _refuse_if_different(net: MultiExitNet, source: str, missing: list[str],
                         shapes: list[str], unexpected: list[str]) -> None:
    parts = [f"{len(keys)} {what} ({_some(keys)})" for keys, what in (
        (missing, "keys missing"), (shapes, "of another shape"),
        (unexpected, "keys this backbone does not have")) if keys]
    if parts:
        raise ByotError(f"--pretrained {source} does not fit {net.config.arch}: "
                        f"{'; '.join(parts)}; pass weights of this very backbone")


def _some(keys: list[str]) -> str:
    more = f", and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def _floats(v: object) -> tuple[float, ...] | None:
    return tuple(float(x) for x in v) if isinstance(v, list | tuple) else None


def imagenet_input_size(arch: str) -> int:
    """The image size the library's ImageNet weights were evaluated at (their crop)."""
    lib, _, name = arch.partition(":") if is_library_arch(arch) else ("tv", "", arch)
    if lib == "timm":
        timm = require("timm", "for timm backbones (--arch timm:NAME)")
        cfg = timm.models.get_pretrained_cfg(name)
        return int(cfg.input_size[-1]) if cfg is not None else 224
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except ValueError:
        return 224
    return int(weights.transforms().crop_size[0])


def _imagenet(net: MultiExitNet) -> Pretrained:
    arch = net.config.arch
    lib, _, name = arch.partition(":") if is_library_arch(arch) else ("tv", "", arch)
    if lib == "timm":
        return _timm_imagenet(net, name)
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except ValueError:
        raise ByotError(f"--pretrained imagenet: torchvision has no weights for {name}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        state = weights.get_state_dict(progress=False)
    except OSError as e:  # URLError, timeouts, DNS failures
        raise ByotError(f"--pretrained imagenet: could not download {weights.url} ({e}); on a "
                        f"machine without internet, copy that file to {cached} (torchvision's "
                        "cache, under $TORCH_HOME), or pass --pretrained PATH") from None
    finally:
        socket.setdefaulttimeout(previous)
    n = load_state(net, state, str(cached))
    transform = weights.transforms()
    return Pretrained(f"torchvision {weights}", n, tuple(transform.mean), tuple(transform.std))


def _timm_imagenet(net: MultiExitNet, name: str) -> Pretrained:
    require("timm", "for timm backbones (--arch timm:NAME)")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        plain = plain_model(f"timm:{name}", 1000, 3, pretrained=True)
    except (OSError, RuntimeError, ValueError) as e:  # huggingface_hub's are OSError/ValueError
        first = (str(e).splitlines() or [""])[0][:160]
        raise ByotError(f"--pretrained imagenet: timm could not get the weights of {name} "
                        f"({type(e).__name__}: {first}); without internet, set HF_HUB_OFFLINE=1 "
                        "with the weights in the Hugging Face cache ($HF_HOME), or pass "
                        "--pretrained PATH") from None
    finally:
        socket.setdefaulttimeout(previous)
    n = load_state(net, plain.state_dict(), f"timm {name}")
    cfg = getattr(plain, "pretrained_cfg", {}) or {}
    return Pretrained(f"timm {name} ({cfg.get('hf_hub_id') or cfg.get('url') or 'weights'})", n,
                      _floats(cfg.get("mean")), _floats(cfg.get("std")))
