"""The TensorRT step of an export: which graph each engine is built from, then the builds.

Every engine stands for one checked fp32 ONNX file written by the same export (exit k's
truncated file -> `exit{k}.engine`, segment k -> `segment{k}.engine`). The graph TensorRT
parses is that file itself, or, where the precision must be in the graph (precision.py), its
fp16 or Q/DQ twin cut from a second capture; twins live in a temp folder, only engines and
their records reach the output folder.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge.export import graph, precision
from byot_edge.export.checks import CheckReport, compare, ort_session, torch_outputs
from byot_edge.export.staging import Staging
from byot_edge.export.trt_build import TIMING_CACHE_NAME, BuildJob, EngineBuilder
from byot_edge.manifest import (
    SEGMENT_ONNX,
    SEGMENT_TRT,
    TRUNCATED_ONNX,
    TRUNCATED_TRT,
    FileEntry,
)
from byot_edge.models import MultiExitNet

_ENGINE_KIND = {TRUNCATED_ONNX: TRUNCATED_TRT, SEGMENT_ONNX: SEGMENT_TRT}


def engine_name(onnx_name: str) -> str:
    return onnx_name.removesuffix(".onnx") + ".engine"


def build_engines(builder: EngineBuilder, stage: Staging, cap: graph.Capture,
                  model: MultiExitNet, files: dict[int, dict[str, FileEntry]], x: np.ndarray,
                  calibration: Callable[[], np.ndarray], out_dir: Path,
                  rtol: float, calibration_record: dict[str, Any] | None = None
                  ) -> list[CheckReport]:
    """Build an engine for every ONNX file in `files`; adds their entries to `files`.
    int8 engines are calibrated on `calibration()` (training images, calibration_set.py),
    which `calibration_record` describes in the manifest."""
    opts = builder.options
    with tempfile.TemporaryDirectory(prefix="byot-trt-") as tmp:
        workdir = Path(tmp)
        twin = None
        if opts.precision == "int8":
            builder.say("quantizing (int8 Q/DQ, calibrated on --data-dir images)")
            twin = precision.int8_capture(cap, calibration(), workdir)
        elif opts.precision == "fp16" and builder.strongly_typed:
            builder.say("capturing a float16 copy for the strongly typed build")
            twin = precision.fp16_capture(model, cap)
        jobs, extra, reports = [], {}, []
        refs = _references(model, x) if opts.precision == "int8" else None
        for k in sorted(files):
            for kind, entry in list(files[k].items()):
                if kind not in _ENGINE_KIND:
                    continue
                source = stage.path(entry.path)
                if twin is not None:
                    proto = precision.cut(twin, k, segment=kind == SEGMENT_ONNX)
                    source = workdir / f"{opts.precision}.{entry.path}"
                    source.write_bytes(proto.SerializeToString())
                    if opts.precision == "int8":
                        extra[(k, _ENGINE_KIND[kind])] = precision.higher_precision_layers(proto)
                        reports.append(_int8_check(source, entry.path, k, kind, x, refs, rtol))
                jobs.append(BuildJob(k, _ENGINE_KIND[kind], engine_name(entry.path), source,
                                     entry))
        cache_path = opts.timing_cache or out_dir / TIMING_CACHE_NAME
        entries, build_reports = builder.build_all(stage, jobs, cache_path)
    for (k, kind), entry in entries.items():
        if (k, kind) in extra and entry.engine is not None:
            entry.engine["higher_precision"] = extra[(k, kind)]
        entry.precision = opts.precision
        if opts.precision == "int8" and calibration_record is not None:
            entry.calibration = {**calibration_record, "scheme": {
                "format": "QDQ", "activations": "int8 (symmetric)", "weights": "int8",
                "per_channel": True, "method": "MinMax", "ops": ["Conv", "Gemm"]}}
        files[k][kind] = entry
    return reports + build_reports


def _references(model: MultiExitNet, x: np.ndarray) -> dict[str, Any]:
    """PyTorch's logits per exit, and each segment's input (the previous section's output)."""
    exits = {k: torch_outputs(model.truncate(k).eval(), x)[0]
             for k in range(1, model.num_exits + 1)}
    inputs, h = {}, x
    for k, seg in enumerate(model.segments(), start=1):
        inputs[k] = h
        h = torch_outputs(seg.eval(), h)[0]
    return {"exits": exits, "segment_inputs": inputs}


def _int8_check(path: Path, name: str, k: int, kind: str, x: np.ndarray, refs: Any,
                rtol: float) -> CheckReport:
    """The Q/DQ graph in ONNX Runtime against PyTorch's fp32 logits: int8's own error, reported
    (not judged: it depends on the data and the calibration, not on the export)."""
    inp = refs["segment_inputs"][k] if kind == SEGMENT_ONNX else x
    session = ort_session(path, fake_quant=True)  # TensorRT's numerics, not the CPU kernels'
    got = session.run(None, {session.get_inputs()[0].name: inp})[-1]
    label = name.removesuffix(".onnx") + ".int8.onnx"
    report = compare(label, k, "int8_onnx", got, refs["exits"][k], rtol)
    report.passed = bool(np.isfinite(got).all())
    report.tolerance = None
    report.note = ("*.int8.onnx: the Q/DQ graph the int8 engines are built from (not kept), "
                   "run unfused (fake-quantized) against PyTorch fp32; int8 error is reported, "
                   "not judged")
    return report
