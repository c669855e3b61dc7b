"""Inputs as the manifest describes them: checking batches, and turning images into batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.manifest import InputSpec

_sum = np.add.reduce  # the ufunc's reduction, without ndarray.sum's Python wrapper
_dot = np.vdot
_DOT_MAX = 8192


def _expected(spec: InputSpec) -> str:
    c, h, w = spec.shape
    return f"[N, {c}, {h}, {w}] ({spec.layout}) {spec.dtype}"


def check_batch(batch: Any, spec: InputSpec) -> np.ndarray:
    """The batch as a contiguous array, or a ByotError naming what the manifest expects."""
    # An exact type test first: hasattr on an array raises and catches an AttributeError,
    # which costs more than the rest of the check (docs/design.md, "The runtime's own time").
    if type(batch) is not np.ndarray:
        if hasattr(batch, "detach"):  # a torch tensor
            batch = batch.detach().cpu().numpy()
        if not isinstance(batch, np.ndarray):
            raise ByotError(f"expected a numpy array {_expected(spec)}, got "
                            f"{type(batch).__name__}")
    c, h, w = spec.shape
    if batch.ndim == 4 and batch.shape[1:] == (c, h, w) and len(batch):
        return _checked_values(batch, spec)  # the usual case, without building messages
    want = _expected(spec)
    if batch.ndim == 3 and tuple(batch.shape) == (c, h, w):
        raise ByotError(f"expected a batch {want}, got one image of shape {list(batch.shape)}; "
                        "add the batch axis with x[None]")
    if batch.ndim != 4:
        raise ByotError(f"expected a batch {want}, got shape {list(batch.shape)}")
    if tuple(batch.shape[1:]) == (h, w, c) and (h, w, c) != (c, h, w):
        raise ByotError(f"expected {want}, got shape {list(batch.shape)}, which looks NHWC; "
                        "transpose it with x.transpose(0, 3, 1, 2)")
    if tuple(batch.shape[1:]) != (c, h, w):
        raise ByotError(f"expected {want}, got shape {list(batch.shape)}; resize the images to "
                        f"{h}x{w} with {c} channel(s) (byot_edge.runtime.preprocess.load_images "
                        "does it from files)")
    if len(batch) == 0:
        raise ByotError(f"the batch is empty; pass at least one sample {want}")
    return _checked_values(batch, spec)


def _checked_values(batch: np.ndarray, spec: InputSpec) -> np.ndarray:
    """dtype and finiteness of a batch of the right shape."""
    if batch.dtype != np.dtype(spec.dtype):
        want = _expected(spec)
        hint = (" of raw pixels; normalise them with byot_edge.runtime.preprocess.normalise"
                if batch.dtype == np.uint8 else f"; cast it with x.astype(np.{spec.dtype})")
        raise ByotError(f"expected {want} normalised with mean {spec.mean} and std {spec.std}, "
                        f"got dtype {batch.dtype}{hint}")
    # One pass instead of isfinite + all (at batch 1 each numpy call counts: see
    # docs/design.md, "The runtime's own time"): a NaN or inf anywhere makes x.x or the sum
    # non-finite; a finite batch whose x.x or sum overflows takes the exact check. x.x is
    # BLAS's, half the cold cost of a reduction, and single-threaded on small batches
    # (OpenBLAS threads longer vectors, and its threads would take the inference's cores).
    total = (_dot(batch, batch) if batch.size <= _DOT_MAX and batch.dtype != np.float16
             else _sum(batch, None, np.float64))
    if math.isfinite(total) or np.isfinite(batch).all():
        return np.ascontiguousarray(batch)
    bad = np.flatnonzero(~np.isfinite(batch.reshape(len(batch), -1)).all(axis=1))
    raise ByotError(f"sample(s) {bad[:5].tolist()}{'...' if len(bad) > 5 else ''} of the "
                    "batch contain NaN or inf; pass finite, normalised values")


def normalise(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 [N, C, H, W] pixels (0..255) -> the float batch the model expects."""
    c = spec.shape[0]
    x = np.asarray(pixels, dtype=np.float32) / 255.0
    mean = np.broadcast_to(np.asarray(spec.mean, np.float32), (c,))[:, None, None]
    std = np.broadcast_to(np.asarray(spec.std, np.float32), (c,))[:, None, None]
    return ((x - mean) / std).astype(spec.dtype)


def check_image_channels(spec: InputSpec) -> None:
    """Images can feed 1- (grayscale) and 3-channel (RGB) models only."""
    if spec.shape[0] not in (1, 3):
        raise ByotError(f"the model takes {spec.shape[0]}-channel input; images can only be fed "
                        "to 1- or 3-channel models, pass arrays to AnytimeModel.predict instead")


def image_array(img: Any, spec: InputSpec) -> np.ndarray:
    """An opened PIL image as uint8 [C, H, W]: converted to the manifest's channel count
    (grayscale for 1, RGB for 3) and resized to its height and width. Files (load_image)
    and the server's uploads both decode through here, so they give the same pixels."""
    from PIL import Image

    c, h, w = spec.shape
    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if c == 1 else a.transpose(2, 0, 1)


def load_image(path: str | Path, spec: InputSpec,
               formats: Sequence[str] | None = None) -> np.ndarray:
    """One image file as uint8 [C, H, W] (see image_array). `formats`: the Pillow formats
    accepted (default: any it reads)."""
    from PIL import Image, UnidentifiedImageError

    check_image_channels(spec)
    w, h = spec.shape[2], spec.shape[1]
    try:
        with Image.open(path, formats=formats) as img:
            return image_array(img, spec)
    except FileNotFoundError:
        raise ByotError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ByotError(f"cannot read {path} as an image ({e}); pass PNG, JPEG or another "
                        "format Pillow reads") from None
    except Image.DecompressionBombError as e:  # not an OSError: its header says > 179M pixels
        raise ByotError(f"{path} is too large to decode ({e}); resize it to {w}x{h}") from None


def load_images(paths: Sequence[str | Path], spec: InputSpec) -> np.ndarray:
    """Image files -> one normalised batch [N, C, H, W] as the manifest describes."""
    if not paths:
        raise ByotError("no images given")
    return normalise(np.stack([load_image(p, spec) for p in paths]), spec)
