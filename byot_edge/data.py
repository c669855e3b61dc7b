"""Batches for training and evaluation: uint8 arrays augmented and normalised on the device.

Cropping, flipping and normalising run as tensor ops on the training device (like airbench),
so training never waits on a Python data pipeline: what makes short CPU runs possible.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from byot_edge.datasets import DatasetInfo


def normalize_tensor(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW on the training device -> normalised float (the runtime's numpy twin is
    `runtime.preprocess.normalise`)."""
    return (x.float() / 255 - mean) / std


class Batches:
    """Shuffled, augmented, normalised batches from uint8 tensors already on the device."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DatasetInfo,
        *,
        batch_size: int,
        train: bool,
        generator: torch.Generator | None = None,
        cutout: int = 0,
        autoaugment: bool = False,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),  # (rank, world size) for DDP
    ) -> None:
        self.images, self.labels, self.info = images, labels, info
        self.batch_size, self.train, self.generator = batch_size, train, generator
        self.cutout, self.autoaugment, self.channels_last = cutout, autoaugment, channels_last
        self.rank, self.world = shard
        self.mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        n = len(self.labels) // self.world
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=self.generator).to(self.images.device)
        else:
            order = torch.arange(n, device=self.images.device)
        order = order[self.rank:: self.world]
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.train:
                x = self._augment(x)
            x = normalize_tensor(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        if self.autoaugment:
            x = _autoaugment(x)
        n, _, h, w = x.shape
        rand = self._rand
        p = self.info.crop_pad
        if p:
            x = _random_crop(x, p, rand(n, high=2 * p + 1), rand(n, high=2 * p + 1))
        if self.info.flip:
            flip = rand(n, high=2).bool()[:, None, None, None]
            x = torch.where(flip, x.flip(-1), x)
        if self.cutout:
            cy, cx = rand(n, high=h), rand(n, high=w)
            ys = torch.arange(h, device=x.device)[None, :, None]
            xs = torch.arange(w, device=x.device)[None, None, :]
            half = self.cutout // 2
            hole = ((ys - cy[:, None, None]).abs() < half) & ((xs - cx[:, None, None]).abs() < half)
            x = x.masked_fill(hole[:, None], 0)
        return x

    def _rand(self, n: int, *, high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.generator).to(self.images.device)


def _random_crop(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Crop each zero-padded image at its own offset: one slice per offset value, rows then
    columns (2 * (2p+1) copies), much faster than a per-pixel gather."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = torch.empty(n, c, h, w + 2 * pad, dtype=x.dtype, device=x.device)
    for s in range(2 * pad + 1):
        rows[dy == s] = padded[dy == s, :, s:s + h]
    out = torch.empty_like(x)
    for s in range(2 * pad + 1):
        out[dx == s] = rows[dx == s, :, :, s:s + w]
    return out


def _autoaugment(x: torch.Tensor) -> torch.Tensor:
    # AutoAugment's ops differ per image, so this is a per-sample loop on the CPU: an option
    # for the paper recipe on GPUs, not for quick CPU runs.
    from torchvision.transforms import v2

    aug = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    return torch.stack([aug(img) for img in x.cpu()]).to(x.device)
