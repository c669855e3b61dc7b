"""The graphs TensorRT parses for fp16 and int8 engines, when the precision must be in the graph.

- fp16, strongly typed: the network captured again in float16 (inputs and outputs stay
  float32), cut into the same files as the checked fp32 capture.
- int8, any TensorRT: explicit quantization. ONNX Runtime's static quantizer puts symmetric
  int8 Q/DQ pairs (per-channel weights) on the inputs of every Conv and Gemm, calibrated on
  real images; everything else (attention upsample and sigmoid, residual adds, pooling,
  hard-swish) stays in higher precision, and the build record lists those layers. The Q/DQ
  graph also runs in ONNX Runtime on the CPU, so the int8 numerics are measured here, before
  any GPU sees them.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from byot_edge.export import graph
from byot_edge.models import MultiExitNet

if TYPE_CHECKING:
    import onnx

# Nodes that move or describe data rather than compute on it: not "layers" for the report.
_PLUMBING = {"QuantizeLinear", "DequantizeLinear", "Identity", "Constant", "Shape", "Gather",
             "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Reshape", "Flatten"}
_FUSED_EPILOGUE = {"Relu", "Clip", "Add", "LeakyRelu"}


def fp16_capture(model: MultiExitNet, cap: graph.Capture) -> graph.Capture:
    return graph.capture(model, batch=cap.batch, opset=cap.opset,
                         exporter=cap.exporter, dtype=torch.float16)  # type: ignore[arg-type]


def int8_capture(cap: graph.Capture, calibration: np.ndarray, workdir: Path) -> graph.Capture:
    """The whole fp32 graph with Q/DQ pairs, calibrated on `calibration` (normalised images)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from byot_edge.export.quantize import Reader

    src, dst = workdir / "whole.onnx", workdir / "whole.int8.onnx"
    onnx.save(cap.model, src)
    with _quiet_quantizer():
        quantize_static(
            str(src), str(dst), Reader(calibration, cap.batch), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=["Conv", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
            # TensorRT takes symmetric int8 only, and fp32 biases (it folds them itself).
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           "QuantizeBias": False},
        )
    return graph.Capture(onnx.load(dst), cap.num_exits, cap.exporter, cap.opset, cap.batch)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice goes to the root logger
    try:
        yield
    finally:
        root.setLevel(level)


def cut(cap: graph.Capture, k: int, segment: bool) -> onnx.ModelProto:
    """Exit k's truncated file or segment k out of a (possibly quantized) capture."""
    proto = graph.segment(cap, k) if segment else graph.truncated(cap, k)
    if segment and k > 1:
        _requantize_input(proto, cap.model)
    return proto


def _requantize_input(sub: onnx.ModelProto, whole: onnx.ModelProto) -> None:
    """In the Q/DQ graph a section output is a DequantizeLinear's output, so a segment that
    starts there would feed its first conv unquantized floats: put the same Q/DQ pair back."""
    import onnx

    name = sub.graph.input[0].name
    producers = {o: n for n in whole.graph.node for o in n.output}
    dq = producers.get(name)
    q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear":
        return
    # Names of their own: the runtime joins segments into one graph (onnx_join), where the
    # previous segment's quantizer-made pair for this tensor is kept too.
    requantized, quantized = f"{name}_requantized", f"{name}_requantized_q"
    for node in sub.graph.node:
        node.input[:] = [requantized if n == name else n for n in node.input]
    pair = [onnx.helper.make_node("QuantizeLinear", [name, *q.input[1:]], [quantized],
                                  name=f"{name}_requantize_QuantizeLinear", **_attrs(q)),
            onnx.helper.make_node("DequantizeLinear", [quantized, *dq.input[1:]],
                                  [requantized], name=f"{name}_requantize_DequantizeLinear",
                                  **_attrs(dq))]
    have = {i.name for i in sub.graph.initializer}
    for init in whole.graph.initializer:
        if init.name in {*q.input[1:], *dq.input[1:]} - have:
            sub.graph.initializer.append(init)
    nodes = [*pair, *sub.graph.node]
    del sub.graph.node[:]
    sub.graph.node.extend(nodes)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def higher_precision_layers(proto: onnx.ModelProto) -> dict[str, Any]:
    """Layers of a Q/DQ graph that get no int8 input, so TensorRT runs them in fp16/fp32,
    counted by op type and named. A pointwise op right after a quantized conv (ReLU, residual
    add) is left out: TensorRT fuses it into the conv's int8 kernel."""
    producers = {o: n for n in proto.graph.node for o in n.output}

    def from_dq(name: str) -> bool:
        p = producers.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    names, counts, quantized = [], collections.Counter(), 0
    fusable: set[str] = set()  # outputs of int8 convs and of the pointwise ops fused into them
    for node in proto.graph.node:  # nodes are in topological order
        if node.op_type in _PLUMBING:
            continue
        if any(from_dq(i) for i in node.input):
            quantized += node.op_type in ("Conv", "Gemm", "MatMul")
            fusable.update(node.output)
            continue
        if node.op_type in _FUSED_EPILOGUE and any(i in fusable for i in node.input):
            fusable.update(node.output)
            continue
        names.append(node.name or node.op_type)
        counts[node.op_type] += 1
    return {"int8_layers": quantized, "by_op_type": dict(sorted(counts.items())),
            "layers": names}
