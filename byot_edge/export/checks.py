"""Numerical checks: every exported file, run by ONNX Runtime, against PyTorch on the same inputs.

Errors are measured on the logits: max absolute difference, and that divided by the largest
reference logit (so the tolerance does not depend on the logits' scale, and a logit near zero
does not blow up a per-element ratio). Top-1 agreement is reported, not judged: two nearly
tied classes may swap within any tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from byot_edge.errors import ByotError

CHECK_SAMPLES = 16  # a dynamic-batch file is checked on this many inputs
_SEED = 0


@dataclass
class CheckReport:
    """The outcome of checking one exported file."""

    file: str  # name in the output folder, e.g. "exit2.onnx"
    exit: int
    kind: str  # "exit" | "segment" | "engine" | "segment_engine"
    backend: str  # what checked it: "onnxruntime", "trt-builder" (network), "trt-runtime"
    passed: bool
    samples: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    top1_agreement: float | None = None
    tolerance: float | None = None
    note: str = ""
    # int8 files are judged by top-1 agreement with PyTorch (>= this), their logits error is
    # reported: quantization error depends on the data and calibration, not on the export.
    min_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(file: str, k: int, kind: str, got: np.ndarray, ref: np.ndarray,
            rtol: float) -> CheckReport:
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    if got64.shape != ref64.shape:
        return CheckReport(file, k, kind, "onnxruntime", False, len(ref), note=(
            f"output shape {list(got.shape)} != PyTorch's {list(ref.shape)}"))
    max_abs = float(np.abs(got64 - ref64).max())
    max_rel = max_abs / max(float(np.abs(ref64).max()), 1e-12)
    top1 = float((got64.argmax(1) == ref64.argmax(1)).mean())
    finite = bool(np.isfinite(got64).all())
    return CheckReport(file, k, kind, "onnxruntime", finite and max_rel <= rtol, len(ref),
                       max_abs, max_rel, top1, rtol, "" if finite else "non-finite outputs")


def check_inputs(state: dict[str, Any], shape: Sequence[int], n: int,
                 data_dir: str | Path | None, dataset: str | None) -> tuple[np.ndarray, str]:
    """`n` normalised inputs [n, C, H, W] float32, and where they came from.

    Real images (the test split of `dataset` under `data_dir`) when a data folder is given,
    else a fixed-seed standard-normal batch: inputs already in normalised units.
    """
    if data_dir is None:
        g = torch.Generator().manual_seed(_SEED)
        return torch.randn(n, *shape, generator=g).numpy(), f"random normal (seed {_SEED})"
    data = state.get("data", {})
    name = dataset or data.get("dataset")
    if not name:
        raise ByotError("the checkpoint does not say which dataset it was trained on; pass "
                        "--dataset NAME with --data-dir")
    from byot_edge.datasets import load_arrays

    arrays = load_arrays(name, data_dir, "test")
    images = arrays[0] if isinstance(arrays, tuple) else arrays.images
    if len(images) == 0:
        raise ByotError(f"the {name} test split under {data_dir} is empty; point --data-dir at "
                        "a dataset with a test split")
    images = np.resize(images, (n, *images.shape[1:]))  # repeats when the split is small
    if list(images.shape[1:]) != list(shape):
        raise ByotError(f"images in {data_dir} are {list(images.shape[1:])}, the model takes "
                        f"{list(shape)}; pass the dataset it was trained on (--dataset)")
    mean = np.asarray(data.get("mean", [0.0]), np.float32).reshape(-1, 1, 1)
    std = np.asarray(data.get("std", [1.0]), np.float32).reshape(-1, 1, 1)
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(x, np.float32), f"{name} test split, {data_dir}"


def ort_session(path: Path, fake_quant: bool = False) -> Any:
    """A CPU ONNX Runtime session; full graph optimisation, as a deployment would run it.

    `fake_quant`: run a Q/DQ graph as written (float ops between Quantize and Dequantize)
    instead of fusing it into ONNX Runtime's int8 kernels, whose int16 accumulation saturates
    on CPUs without VNNI: how a TensorRT int8 graph's numerics are emulated here."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if fake_quant:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    # A check, not a benchmark: idle threads sleep instead of spinning, which on a busy
    # machine would steal the cores PyTorch needs for the reference.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def torch_outputs(module: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    outs = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in outs]


def check_exit(path: Path, file: str, k: int, x: np.ndarray, reference: np.ndarray,
               rtol: float) -> CheckReport:
    """The truncated file for exit k against PyTorch's logits of that exit."""
    session = ort_session(path)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    return compare(file, k, "exit", got, reference, rtol)


def check_segments(paths: Sequence[tuple[Path, str]], x: np.ndarray,
                   references: Callable[[int], np.ndarray], rtol: float) -> list[CheckReport]:
    """Chain the segment files in ONNX Runtime, each fed the previous one's ORT output, and
    compare every exit's logits with PyTorch's: what a cascade will actually compute."""
    reports, h = [], x
    for k, (path, file) in enumerate(paths, start=1):
        session = ort_session(path)
        outs = session.run(None, {session.get_inputs()[0].name: h})
        reports.append(compare(file, k, "segment", outs[-1], references(k), rtol))
        if len(outs) > 1:
            h = outs[0]
    return reports


def failure_message(failed: Sequence[CheckReport]) -> str:
    parts = []
    for r in failed:
        if r.min_agreement is not None and r.top1_agreement is not None:
            parts.append(f"exit {r.exit} ({r.file}): top-1 agreement with PyTorch "
                         f"{r.top1_agreement:.1%} < {r.min_agreement:.1%}"
                         + (f", {r.note}" if r.note else ""))
        elif r.max_rel is None:
            parts.append(f"exit {r.exit} ({r.file}): {r.note or 'check failed'}")
        else:
            parts.append(f"exit {r.exit} ({r.file}): max abs error {r.max_abs:.3g}, relative "
                         f"{r.max_rel:.3g} > {r.tolerance:g}" + (f", {r.note}" if r.note else ""))
    if all(r.min_agreement is not None for r in failed):
        return ("the int8 files disagree with PyTorch: " + "; ".join(parts) + ". Nothing was "
                "written; calibrate on more images (--calibration-images), export fp32, or "
                "lower --int8-agreement if the loss is acceptable")
    return ("ONNX Runtime does not reproduce PyTorch for " + "; ".join(parts)
            + ". Nothing was written; try --exporter torchscript or another --opset, or raise "
            "--rtol if the difference is acceptable")


def judge_int8(report: CheckReport, min_agreement: float) -> CheckReport:
    """An int8 file passes on finite logits and top-1 agreement with PyTorch >= the bound."""
    finite = not report.note.startswith("non-finite") and report.max_rel is not None
    report.passed = finite and (report.top1_agreement or 0.0) >= min_agreement
    report.tolerance, report.min_agreement = None, min_agreement
    return report
