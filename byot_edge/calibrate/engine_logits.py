"""Validation logits from the deployed files, run through a runtime backend.

Thresholds fitted on PyTorch's fp32 logits are not the thresholds for an int8 or fp16 file:
its confidences move. So `calibrate --data-dir` runs the very files a backend serves (its
segments chained, as the cascade runs them, else each exit's truncated file) on the
validation split the training held out, and calibrates on their logits.

The split is the manifest's `validation` record (the dataset, fraction and seed `train`
used, written by export): the same images `byot-edge eval --split val` picks, drawn from the
training split with `train_val_split`. Numpy only, so it works on the runtime install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from byot_edge.calibrate.logits import ValLogits
from byot_edge.datasets import Arrays, dataset_info, load_arrays, train_val_split
from byot_edge.errors import ByotError
from byot_edge.manifest import Manifest
from byot_edge.runtime.backends import EXIT, SEGMENT, Backend, artifact_name, get_backend
from byot_edge.runtime.preprocess import normalise

BATCH = 128  # images per call: large enough to amortise a call, small enough for any edge box


def validation_arrays(manifest: Manifest, data_dir: str | Path) -> tuple[Arrays, str]:
    """The validation split the model's training held out, and a line saying which it is."""
    val = manifest.validation
    fix = ("re-export the checkpoint with `byot-edge export CHECKPOINT --out "
           f"{manifest.root}` (it records the split), or calibrate on `byot-edge eval "
           "CHECKPOINT --split val --save-logits FILE` with --logits FILE")
    if val is None:
        raise ByotError(f"the manifest in {manifest.root} does not record which images the "
                        f"training held out for validation; {fix}")
    if not val.fraction:
        raise ByotError("the model was trained with --val-split 0, so it has no held-out "
                        "validation split to calibrate on (never calibrate on the test split); "
                        "retrain with --val-split 0.1")
    size = manifest.input.shape[-1] if val.dataset == "imagefolder" else None
    info = dataset_info(val.dataset, size)
    try:
        train = load_arrays(val.dataset, data_dir, "train", info.input_size)
    except ByotError as e:
        raise ByotError(f"--data-dir {data_dir}: the validation split is {val.fraction:g} of "
                        f"{val.dataset}'s training images, and they cannot be read: {e}"
                        ) from None
    if list(train.images.shape[1:]) != list(manifest.input.shape):
        raise ByotError(f"--data-dir {data_dir} holds {list(train.images.shape[1:])} images, "
                        f"the model takes {manifest.input.shape}; pass the {val.dataset} "
                        "folder it was trained on")
    _, idx = train_val_split(len(train.labels), val.fraction, val.seed)
    what = (f"{val.dataset} validation split ({len(idx)} images: {val.fraction:g} of "
            f"{len(train.labels)} training images, seed {val.seed}) under {data_dir}")
    return train.subset(idx), what


def check_precision(backend: Backend, precision: str | None) -> str:
    """The precision of the files `backend` runs; a ByotError when it is not the one asked."""
    found = backend.files_precision()
    if precision is not None and precision != found and backend.file_kinds is None:
        raise ByotError(f"--precision {precision}: the {backend.name} backend runs the fp32 "
                        "weights, never the folder's ONNX files; use --backend onnxruntime "
                        f"for {precision} files (or tensorrt for engines)")
    if precision is not None and precision != found:
        folder = backend.manifest.root
        how = ("`byot-edge export CHECKPOINT --segments --precision int8 --data-dir DIR --out "
               "NEW_FOLDER`" if precision == "int8" else "`byot-edge export` with that "
               "--precision")
        raise ByotError(f"--precision {precision}: the {backend.name} backend runs {found} "
                        f"files in {folder}, none of them {precision}; export them with {how}, "
                        f"or leave out --precision to calibrate the {found} files")
    return found


def engine_logits(manifest: Manifest, data_dir: str | Path, *, backend: str = "onnxruntime",
                  precision: str | None = None, device: str | None = None,
                  threads: int | None = None) -> ValLogits:
    """Every exit's logits on the validation split, from the files `backend` serves."""
    options = {"threads": threads} if threads else {}
    with get_backend(backend, manifest, device=device, **options) as be:
        found = check_precision(be, precision)
        data, what = validation_arrays(manifest, data_dir)
        static = _static_batch(be)
        step = static or BATCH
        chunks = []
        for i in range(0, len(data.labels), step):
            x = normalise(data.images[i:i + step], manifest.input)
            chunks.append(_batch_logits(be, _padded(x, static) if static else x)[:, :len(x)])
        logits = np.concatenate(chunks, axis=1)
    if not np.isfinite(logits).all():
        raise ByotError(f"the {backend} backend's {found} files gave NaN or inf logits on the "
                        "validation split; re-export them")
    return ValLogits(logits.astype(np.float32), data.labels.astype(np.int64), "val",
                     manifest.validation.dataset if manifest.validation else "",
                     Path(data_dir), be.name, found,
                     f"{be.name} {found} files on the {what}")


def _static_batch(be: Backend) -> int | None:
    """The batch size ONNX files exported with a static `--batch` take (None: dynamic).
    Engines pad and split batches themselves."""
    if be.name != "onnxruntime" or be.file_kinds is None:
        return None
    files = be.manifest.exit(1).files
    entry = files.get(be.file_kinds[SEGMENT]) or files.get(be.file_kinds[EXIT])
    first = entry.inputs[0].shape[0] if entry is not None and entry.inputs else None
    return first if isinstance(first, int) and first > 0 else None


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    """`x` with zero samples appended up to `size` (the last chunk of a static batch)."""
    if len(x) >= size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def _batch_logits(be: Backend, x: np.ndarray) -> np.ndarray:
    """[K, n, C]: the segments chained (what the cascade runs), else each exit's file."""
    k_max = be.manifest.num_exits
    out = []
    if all(be.has(artifact_name(SEGMENT, k)) for k in range(1, k_max + 1)):
        h = x
        for k in range(1, k_max + 1):
            io = be.load(artifact_name(SEGMENT, k))
            res = be.run(artifact_name(SEGMENT, k), {io.input: h})
            out.append(res[io.logits])
            if io.section is not None:
                h = res[io.section]
        return np.stack(out)
    for k in range(1, k_max + 1):
        io = be.load(artifact_name(EXIT, k))  # raises the re-export hint when missing
        out.append(be.run(artifact_name(EXIT, k), {io.input: x})[io.logits])
    return np.stack(out)
