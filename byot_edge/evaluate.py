"""Per-exit and ensemble accuracy, the cost of each exit, and logits dumps for calibration."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from byot_edge.data import Batches
from byot_edge.datasets import Arrays, DatasetInfo
from byot_edge.errors import ByotError
from byot_edge.fileio import atomic_write
from byot_edge.models import MultiExitNet


@dataclass
class ExitRow:
    name: str  # "exit 1".."exit K", or "ensemble"
    top1: float
    top5: float | None
    params: int | None
    flops: int | None


@dataclass
class EvalResult:
    rows: list[ExitRow]
    logits: np.ndarray  # float32 [K, N, C]
    labels: np.ndarray  # int64 [N]
    split: str
    dataset: str

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "dataset": self.dataset, "samples": len(self.labels),
                "exits": [asdict(r) for r in self.rows]}


@torch.no_grad()
def predict_logits(model: torch.nn.Module, batches: Batches, device: torch.device,
                   amp_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every exit's logits for every sample, in order: float32 [K, N, C], labels [N]."""
    model.eval()
    chunks, labels = [], []
    for x, y in batches:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        chunks.append(torch.stack([z.float() for z in out.logits]))
        labels.append(y)
    return (torch.cat(chunks, dim=1).cpu().numpy().astype(np.float32),
            torch.cat(labels).cpu().numpy().astype(np.int64))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=-1)[..., :k]
    return float((top == labels[..., None]).any(-1).mean())


def accuracy_rows(logits: np.ndarray, labels: np.ndarray,
                  model: MultiExitNet | None = None) -> list[ExitRow]:
    """One row per exit plus the ensemble (mean of all exits' logits)."""
    k5 = logits.shape[-1] >= 5
    exits = model.exits if model is not None else None
    rows = []
    for k, z in enumerate(logits, start=1):
        info = exits[k - 1] if exits else None
        rows.append(ExitRow(f"exit {k}", topk_accuracy(z, labels, 1),
                            topk_accuracy(z, labels, 5) if k5 else None,
                            info.params if info else None, info.flops if info else None))
    ens = logits.mean(0)
    total_params = sum(p.numel() for p in model.parameters()) if model is not None else None
    total_flops = _ensemble_flops(model) if model is not None else None
    rows.append(ExitRow("ensemble", topk_accuracy(ens, labels, 1),
                        topk_accuracy(ens, labels, 5) if k5 else None, total_params, total_flops))
    return rows


def _ensemble_flops(model: MultiExitNet) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(model.example_input().to(p.device, p.dtype))
    return int(counter.get_total_flops())


def evaluate(model: MultiExitNet, data: Arrays, info: DatasetInfo, *, split: str,
             batch_size: int = 256, device: str | torch.device = "cpu") -> EvalResult:
    device = torch.device(device)
    _check_compatible(model, data, info)
    batches = Batches(torch.from_numpy(data.images).to(device),
                      torch.from_numpy(data.labels).to(device), info,
                      batch_size=batch_size, train=False)
    logits, labels = predict_logits(model.to(device), batches, device)
    return EvalResult(accuracy_rows(logits, labels, model), logits, labels, split, info.name)


def _check_compatible(model: MultiExitNet, data: Arrays, info: DatasetInfo) -> None:
    c = model.config
    shape = tuple(data.images.shape[1:])
    if shape != (c.in_chans, c.input_size, c.input_size):
        raise ByotError(f"the checkpoint expects {c.in_chans}x{c.input_size}x{c.input_size} "
                        f"images but {info.name} gives {'x'.join(map(str, shape))}; evaluate on "
                        "the dataset the model was trained on")
    if int(data.labels.max(initial=0)) >= c.num_classes:
        raise ByotError(f"{info.name} has labels up to {int(data.labels.max())} but the model "
                        f"has {c.num_classes} classes; evaluate on the dataset it was trained on")


def save_logits(path: str | Path, result: EvalResult) -> Path:
    """`logits` [K, N, C], `labels` [N], `split`, `dataset`, `exits` [1..K]: for calibration."""
    k = result.logits.shape[0]

    def write(f: Any) -> None:
        np.savez(f, logits=result.logits, labels=result.labels, split=result.split,
                 dataset=result.dataset, exits=np.arange(1, k + 1))

    return atomic_write(path, write)
