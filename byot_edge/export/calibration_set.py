"""The images int8 is calibrated on, and the ones its check runs on: never validation or test.

Calibration images come from the checkpoint's training split with the images its training held
out for validation (same fraction and seed as `train`) taken away, so thresholds later
calibrated on the validation split never see images the quantizer was fitted to. The int8
check runs on that validation split when the checkpoint has one, else on training images the
calibration did not use. Picks are a fixed-seed permutation: the same flags give the same set,
and the manifest records a hash of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge.errors import ByotError

SEED = 0
DEFAULT_IMAGES = 512  # --calibration-images when not given
CHECK_IMAGES = 256  # how many held-out images the int8 check compares on


@dataclass
class CalibrationSet:
    images: np.ndarray  # normalised float32 [N, C, H, W]
    check_images: np.ndarray  # held out from `images`, same normalisation
    record: dict[str, Any]  # what the manifest stores per int8 file
    check_source: str


def calibration_set(state: dict[str, Any], shape: list[int], n: int,
                    data_dir: str | Path | None, dataset: str | None,
                    n_check: int = CHECK_IMAGES) -> CalibrationSet:
    """`n` calibration images from the training split, and up to `n_check` held-out ones."""
    from byot_edge.datasets import dataset_info, load_arrays, train_val_split

    if n < 1:
        raise ByotError(f"--calibration-images must be >= 1, got {n}: int8 is calibrated on "
                        "real training images (e.g. --calibration-images 512)")
    data, tc = state.get("data") or {}, state.get("train_config") or {}
    name = dataset or data.get("dataset")
    if not name:
        raise ByotError("the checkpoint does not say which dataset it was trained on; pass "
                        "--dataset NAME and --data-dir for the int8 calibration images")
    folder = data_dir or tc.get("data_dir")
    if folder is None:  # even for synthetic data: int8 is never calibrated on made-up inputs
        raise ByotError(f"--precision int8 calibrates on real {name} training images: pass "
                        "--data-dir (the folder `byot-edge train` read; and --dataset if the "
                        "checkpoint does not name it)")
    size = data.get("input_size") if name == "imagefolder" else None
    train = load_arrays(name, folder, "train", dataset_info(name, size).input_size)
    fraction = float(tc.get("val_split") or 0)
    if fraction:
        pool, val = train_val_split(len(train.labels), fraction, int(tc.get("seed", 0)))
    else:
        pool, val = np.arange(len(train.labels)), np.arange(0)
    order = np.random.default_rng(SEED).permutation(pool)
    if n > len(order):
        raise ByotError(f"--calibration-images {n} is more than the {len(order)} training "
                        f"images of {name} under {folder} (validation images excluded); "
                        "ask for fewer")
    picked = np.sort(order[:n])
    if len(val):
        check = np.random.default_rng(SEED).permutation(val)[:n_check]
        source = f"{name} validation split (held out of training), {folder}"
    else:
        check = order[n:n + n_check]
        source = f"{name} training images not used for calibration, {folder}"
    if len(check) == 0:
        raise ByotError(f"all {len(order)} training images went to calibration, none is left "
                        "to check the int8 files on: ask for fewer --calibration-images")
    images = train.images[picked]
    if list(images.shape[1:]) != list(shape):
        raise ByotError(f"images in {folder} are {list(images.shape[1:])}, the model takes "
                        f"{shape}; pass the dataset it was trained on (--dataset)")
    normalise = _normaliser(data)
    record = {"dataset": name, "split": "train", "images": int(n), "seed": SEED,
              "excludes": f"validation split ({fraction:g} of train, seed "
                          f"{int(tc.get('seed', 0))})" if fraction else "none (no val split)",
              "sha256": hashlib.sha256(images.tobytes()).hexdigest()}
    return CalibrationSet(normalise(images), normalise(train.images[np.sort(check)]), record,
                          source)


def _normaliser(data: dict[str, Any]) -> Any:
    mean = np.asarray(data.get("mean", [0.0]), np.float32).reshape(-1, 1, 1)
    std = np.asarray(data.get("std", [1.0]), np.float32).reshape(-1, 1, 1)

    def normalise(images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((images.astype(np.float32) / 255.0 - mean) / std)

    return normalise
