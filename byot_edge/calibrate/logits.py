"""The logits calibration chooses thresholds on, and the temperature fitted to them.

The first source is a file that `byot-edge eval --split val --save-logits` wrote from the
checkpoint (PyTorch, fp32); the second, `calibrate.engine_logits`, runs the deployed files
on the validation split through a runtime backend. Each says whose logits they are (backend
and precision), which the thresholds record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from byot_edge.errors import ByotError


@dataclass(frozen=True)
class ValLogits:
    logits: np.ndarray  # [K, N, C] float32
    labels: np.ndarray  # [N] int64
    split: str
    dataset: str
    path: Path
    backend: str = "torch"  # whose logits: a runtime backend name ("torch": PyTorch)
    precision: str = "fp32"  # of the files that backend ran
    description: str = ""  # where they come from, for the thresholds' source (default: path)

    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]


def load_logits(path: str | Path) -> ValLogits:
    """Read a logits file (`np.savez(logits=[K,N,C], labels=[N], split, dataset, exits)`)."""
    path = Path(path)
    if not path.is_file():
        raise ByotError(f"logits file {path} does not exist; write one with `byot-edge eval "
                        "CHECKPOINT --split val --save-logits FILE.npz`")
    try:
        with np.load(path, allow_pickle=False) as d:
            data = {k: d[k] for k in d.files}
    except (ValueError, OSError) as e:
        raise ByotError(f"{path} is not a readable .npz logits file ({e}); write one with "
                        "`byot-edge eval --save-logits`") from None
    missing = [k for k in ("logits", "labels") if k not in data]
    if missing:
        raise ByotError(f"{path} lacks {', '.join(missing)}; write it with `byot-edge eval "
                        "--save-logits`")
    logits, labels = data["logits"], data["labels"]
    if logits.ndim != 3 or labels.ndim != 1 or logits.shape[1] != len(labels):
        raise ByotError(f"{path} holds logits {list(logits.shape)} and labels "
                        f"{list(labels.shape)}; expected [exits, N, classes] and [N]")
    if len(labels) == 0:
        raise ByotError(f"{path} holds no samples")
    if not np.isfinite(logits).all():
        raise ByotError(f"{path} has NaN or inf logits; evaluate a healthy checkpoint")
    if labels.min() < 0 or labels.max() >= logits.shape[2]:
        raise ByotError(f"{path} has labels outside 0..{logits.shape[2] - 1}")
    split = str(data["split"]) if "split" in data else "unknown"
    dataset = str(data["dataset"]) if "dataset" in data else ""
    # Files from `byot-edge eval` say nothing: PyTorch, fp32. Engine logits saved by
    # `calibrate --data-dir --save-logits` say which backend and precision.
    backend = str(data["backend"]) if "backend" in data else "torch"
    precision = str(data["precision"]) if "precision" in data else "fp32"
    return ValLogits(logits.astype(np.float32), labels.astype(np.int64), split, dataset, path,
                     backend, precision)


def save_val_logits(path: str | Path, val: ValLogits) -> Path:
    """`val` as a logits file `load_logits` reads back, whose logits they are included."""
    from byot_edge.fileio import atomic_write

    k = val.num_exits

    def write(f: object) -> None:
        np.savez(f, logits=val.logits, labels=val.labels, split=val.split, dataset=val.dataset,
                 exits=np.arange(1, k + 1), backend=val.backend, precision=val.precision)

    return atomic_write(path, write)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al., 2017):
    golden-section search on log T, which is unimodal in practice."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        logp = s[np.arange(len(y)), y] - np.log(np.exp(s).sum(axis=1))
        return float(-logp.mean())

    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))
