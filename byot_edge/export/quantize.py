"""int8 ONNX files for ONNX Runtime on the CPU: the whole capture quantized once, then cut.

ONNX Runtime's static quantizer (`quant_pre_process`, then `quantize_static` in the QDQ
format, per-channel int8 weights) runs on the *whole* captured network, calibrated on
training images, and every exit, segment and span is cut out of that one quantized graph,
as the fp32 files are cut out of the fp32 capture (graph.py).

How the cut files chain: each hand-off tensor (section k's output) is quantized *once*, with
one calibrated scale and zero point, in the whole graph. A cut keeps the file's inputs and
outputs float32: segment k ends with that tensor's DequantizeLinear, and segment k+1 starts
with a QuantizeLinear with the very same scale and zero point (`precision.cut` puts the pair
back). Dequantizing and quantizing again with one scale returns the same integers, so a
chain of int8 segments computes what the int8 exit file computes, and the runtime's buffers
stay float32 whatever the precision. Quantizing each file on its own would calibrate each
hand-off twice, at both ends, with different scales: two roundings, and a cascade that
disagrees with the exit files it is calibrated against.

Logits stay float32 (the classifier's output is not quantized): an 8-bit logit would put the
softmax confidences the cascade thresholds on a coarse grid.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.export import graph
from byot_edge.export.precision import _quiet_quantizer, cut

if TYPE_CHECKING:
    import onnx

    from byot_edge.export.checks import CheckReport

# Measured on this 2-core AVX2 EPYC (no VNNI), width-0.25 CIFAR model, one thread: uint8
# activations (ONNX Runtime's U8S8 kernels) against int8 (S8S8); see docs/int8.md.
ACTIVATIONS = "uint8"
CALIBRATION_METHOD = "MinMax"
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class Scheme:
    """How a graph is quantized: what the manifest records next to the calibration set."""

    activations: str = ACTIVATIONS  # "uint8" (asymmetric) | "int8" (symmetric)
    weights: str = "int8"
    per_channel: bool = True
    method: str = CALIBRATION_METHOD
    # 7-bit weights. Without VNNI (this AVX2 EPYC), ONNX Runtime's U8S8 kernels add pairs of
    # uint8 x int8 products in int16 (vpmaddubsw), which saturates with full 8-bit weights:
    # measured, top-1 agreement with PyTorch rose from 88-92% to 97-99% with it.
    reduce_range: bool = True

    def record(self) -> dict[str, Any]:
        import onnxruntime

        return {"format": "QDQ", "activations": self.activations, "weights": self.weights,
                "per_channel": self.per_channel, "method": self.method,
                "reduce_range": self.reduce_range,
                "tool": f"onnxruntime {onnxruntime.__version__} quantize_static"}


def quantize_capture(cap: graph.Capture, calibration: np.ndarray,
                     scheme: Scheme = Scheme()) -> graph.Capture:
    """The whole fp32 capture with Q/DQ pairs, calibrated on `calibration` (normalised images)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ByotError("int8 needs calibration images: pass --calibration-images N (N >= 1)")
    act = QuantType.QUInt8 if scheme.activations == "uint8" else QuantType.QInt8
    with tempfile.TemporaryDirectory(prefix="byot-int8-") as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("whole.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(cap.model, src)
        with _quiet_quantizer():
            # Shape inference and ONNX Runtime's graph fusions first, as the quantizer
            # advises: it then sees the graph ONNX Runtime will run. Graph outputs (the
            # section and logits tensors the files are cut at) keep their names. ONNX's own
            # shape inference covers these CNN ops; the symbolic one gives up on the
            # torch.export graphs' dynamic batch axis.
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre), str(dst), Reader(calibration, cap.batch), quant_format=QuantFormat.QDQ,
                activation_type=act, weight_type=QuantType.QInt8, per_channel=scheme.per_channel,
                reduce_range=scheme.reduce_range,
                calibrate_method=getattr(CalibrationMethod, scheme.method),
                extra_options={"ActivationSymmetric": scheme.activations == "int8",
                               "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
            )
        proto = onnx.load(dst)
    _check_cut_points(proto, cap.num_exits)
    return graph.Capture(proto, cap.num_exits, cap.exporter, cap.opset, cap.batch)


class Reader:
    """The quantizer's calibration data reader: the images in batches; with a static batch
    axis, batches of exactly that size (the remainder is left out)."""

    def __init__(self, images: np.ndarray, static_batch: int | None = None) -> None:
        if static_batch:
            usable = len(images) // static_batch * static_batch
            if usable == 0:
                raise ByotError(f"--batch {static_batch} is static, so int8 calibrates on whole "
                                f"batches: pass --calibration-images >= {static_batch}")
            self._batches = iter(np.split(images[:usable], usable // static_batch))
        else:
            chunks = max(1, len(images) // CALIBRATION_BATCH)
            self._batches = iter(np.array_split(images, chunks))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {graph.INPUT: np.ascontiguousarray(batch, np.float32)}

    def rewind(self) -> None:  # part of the reader protocol; one pass is all MinMax needs
        pass


def _check_cut_points(proto: onnx.ModelProto, num_exits: int) -> None:
    outputs = {o.name for o in proto.graph.output}
    want = {graph.section_name(k) for k in range(1, num_exits)}
    missing = sorted(want - outputs)
    if missing:  # a quantizer that renamed them would make every segment cut fail later
        raise ByotError(f"the int8 graph lost the tensors the files are cut at ({missing}); "
                        "this onnxruntime's quantizer is not supported: export fp32")


def int8_file(qcap: graph.Capture, k: int, segment: bool) -> onnx.ModelProto:
    """Exit k's truncated file or segment k, cut out of the quantized capture."""
    return cut(qcap, k, segment)


def int8_name(fp32_name: str) -> str:
    """exit2.onnx -> exit2.int8.onnx: an int8 folder says so in its file names."""
    return fp32_name.removesuffix(".onnx") + ".int8.onnx"


def is_qdq(proto: onnx.ModelProto) -> bool:
    ops = {n.op_type for n in proto.graph.node}
    return {"QuantizeLinear", "DequantizeLinear"} <= ops


# A chain of int8 segments against the int8 exit file: the same integers by construction
# (module docstring), so only float rounding in the fused kernels is left.
CHAIN_RTOL = 1e-3
DEFAULT_MIN_AGREEMENT = 0.9  # top-1 agreement with PyTorch an int8 file must reach


@dataclass
class Int8Export:
    """What an int8 export needs besides the fp32 files it replaces."""

    qcap: graph.Capture
    check_images: np.ndarray
    check_source: str
    calibration: dict[str, Any]  # the manifest's per-file record (with the scheme)
    min_agreement: float


def int8_files(job: Int8Export, stage: Any, model: Any, files: dict[int, dict[str, Any]],
               meta: Callable[[int, str], dict[str, Any]],
               stage_onnx: Callable[..., Any]) -> list[CheckReport]:
    """Replace every staged fp32 ONNX file in `files` by its int8 cut (exit{k}.int8.onnx...),
    each checked against PyTorch on held-out images; segments also against the exit files."""
    from byot_edge.export.checks import compare, judge_int8, torch_outputs
    from byot_edge.manifest import SEGMENT_ONNX, TRUNCATED_ONNX

    x, reports, exit_logits = job.check_images, [], {}
    for k in sorted(files):
        entry = files[k].get(TRUNCATED_ONNX)
        if entry is None:
            continue
        got = _stage_int8(job, stage, k, entry, "exit", meta, stage_onnx, files, x)
        ref = torch_outputs(model.truncate(k).eval(), x)[0]
        reports.append(judge_int8(compare(int8_name(entry.path), k, "int8_exit", got, ref, 1.0),
                                  job.min_agreement))
        exit_logits[k] = got
    h, segment_refs = x, _segment_references(model, x, torch_outputs)
    for k in sorted(files):
        entry = files[k].get(SEGMENT_ONNX)
        if entry is None:
            continue
        outs = _stage_int8(job, stage, k, entry, "segment", meta, stage_onnx, files, h,
                           all_outputs=True)
        report = judge_int8(compare(int8_name(entry.path), k, "int8_segment", outs[-1],
                                    segment_refs[k - 1], 1.0), job.min_agreement)
        if k in exit_logits:  # the cascade must compute what the exit file computes
            chain = compare("", k, "", outs[-1], exit_logits[k], CHAIN_RTOL)
            exit_name = int8_name(f"exit{k}.onnx")
            report.note = f"chained segments vs {exit_name}: rel {chain.max_rel:.1e}"
            report.passed = report.passed and chain.passed
        reports.append(report)
        h = outs[0]
    return reports


def _stage_int8(job: Int8Export, stage: Any, k: int, entry: Any, kind: str,
                meta: Callable[[int, str], dict[str, Any]], stage_onnx: Callable[..., Any],
                files: dict[int, dict[str, Any]], x: np.ndarray,
                all_outputs: bool = False) -> Any:
    """Cut, stamp and stage one int8 file in place of its fp32 twin; returns its outputs."""
    from byot_edge.export.checks import ort_session
    from byot_edge.manifest import SEGMENT_ONNX, TRUNCATED_ONNX

    proto = int8_file(job.qcap, k, segment=kind == "segment")
    name = int8_name(entry.path)
    new = stage_onnx(stage, name, proto, {**meta(k, kind), "precision": "int8",
                                          "calibration": job.calibration})
    new.precision, new.calibration = "int8", dict(job.calibration)
    stage.drop(entry.path)  # checked against PyTorch above; the folder holds int8 only
    files[k][SEGMENT_ONNX if kind == "segment" else TRUNCATED_ONNX] = new
    outs = run_batched(ort_session(stage.path(name)), x, job.qcap.batch)
    return outs if all_outputs else outs[0]


def run_batched(session: Any, x: np.ndarray, static_batch: int | None) -> list[np.ndarray]:
    """All outputs for `x`; a static-batch file is run one batch at a time."""
    name = session.get_inputs()[0].name
    if not static_batch:
        return session.run(None, {name: x})
    runs = [session.run(None, {name: x[i:i + static_batch]})
            for i in range(0, len(x) // static_batch * static_batch, static_batch)]
    return [np.concatenate(parts) for parts in zip(*runs, strict=True)]


def _segment_references(model: Any, x: np.ndarray, torch_outputs: Any) -> list[np.ndarray]:
    refs, h = [], x
    for seg in model.segments():
        outs = torch_outputs(seg.eval(), h)
        refs.append(outs[-1])
        h = outs[0]
    return refs
