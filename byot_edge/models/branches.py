"""The BYOT exit branch: attention, a bottleneck to the deepest section's shape, a classifier.

Follows the paper (Zhang et al., ICCV 2019) and the authors' reference code: a
depthwise-separable conv (stride 2) + BN + ReLU + upsample + sigmoid makes an attention map
that multiplies the section output; depthwise-separable convs then bring the map to the
deepest section's channels and stride; global pooling and a linear layer classify.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SepConv(nn.Sequential):
    """Two depthwise-separable 3x3 convs (the reference code's SepConv); the first one strides."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 2) -> None:
        super().__init__(
            nn.Conv2d(channels_in, channels_in, 3, stride, 1, groups=channels_in, bias=False),
            nn.Conv2d(channels_in, channels_in, 1, bias=False),
            nn.BatchNorm2d(channels_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels_in, channels_in, 3, 1, 1, groups=channels_in, bias=False),
            nn.Conv2d(channels_in, channels_out, 1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
        )


class Attention(nn.Module):
    """Soft spatial attention: sigmoid(upsample(relu(bn(sepconv_stride2(x))))) * x."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SepConv(channels, channels, stride=2)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.norm(self.conv(x)))
        height, width = x.shape[-2:]
        if (height, width) == (2 * a.shape[-2], 2 * a.shape[-1]):
            # A constant scale, not a size read from x's shape: the same numbers, but the
            # exported Resize then needs no shape arithmetic, and ONNX Runtime runs it in its
            # blocked (NCHWc) layout with the convs around it: exit 1's branch went from 0.23
            # to 0.13 ms at width 0.5 (see docs/results.md, "The anytime cascade").
            a = F.interpolate(a, scale_factor=2.0, mode="bilinear", align_corners=False)
        else:  # odd sizes (7x7 sections of 28x28 inputs) upsample to x's own size
            a = F.interpolate(a, size=(height, width), mode="bilinear", align_corners=False)
        return torch.sigmoid(a) * x


class ExitHead(nn.Module):
    """Maps a section's output to (logits, pooled feature). Subclasses set `self.body`."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = torch.flatten(self.pool(self.body(x)), 1)
        return self.fc(feature), feature


class BYOTBranch(ExitHead):
    """A shallow exit: attention + bottleneck to (deep_channels, deep_stride) + pool + fc."""

    def __init__(
        self,
        channels: int,
        stride: int,
        deep_channels: int,
        deep_stride: int,
        num_classes: int,
    ) -> None:
        steps = max(round(math.log2(deep_stride / stride)), 0)
        # Channels grow geometrically from the section's to the deepest's (x2 per step for
        # ResNets, as in the reference code); a same-resolution section gets one stride-1 step.
        widths = [round(channels * (deep_channels / channels) ** (i / max(steps, 1)))
                  for i in range(max(steps, 1) + 1)]
        widths[-1] = deep_channels
        convs = [SepConv(widths[i], widths[i + 1], stride=2 if steps else 1)
                 for i in range(len(widths) - 1)]
        super().__init__(nn.Sequential(Attention(channels), *convs), deep_channels, num_classes)


class DeepestHead(ExitHead):
    """The backbone's own head: an optional last conv (MobileNet's 1x1 expansion), pool, fc.

    Its feature, the distillation target, is the pooled output of the deepest section, which
    is what the shallow branches are shaped to match.
    """

    def __init__(self, channels: int, num_classes: int, body: nn.Module | None = None,
                 body_channels: int | None = None) -> None:
        super().__init__(body or nn.Identity(), body_channels or channels, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = torch.flatten(self.pool(x), 1)
        if isinstance(self.body, nn.Identity):
            return self.fc(feature), feature
        return self.fc(torch.flatten(self.pool(self.body(x)), 1)), feature
