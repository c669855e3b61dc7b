"""ONNX graphs of a multi-exit network: one capture of the whole network, cut per file.

The network is captured once, with every section's output and every exit's logits as graph
outputs; each truncated exit and each cascade segment is then the subgraph between named
tensors (`onnx.utils.Extractor`). That holds exactly the nodes on that path (stages 1..k and
branch k: its FLOPs and parameters are the path's), costs one export instead of 2K (the
torch.export-based exporter takes seconds per capture), and makes every file agree with the
others by construction. The numerical checks then compare each file with `truncate(k)` and
`segments()`, the model's own seams.
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from byot_edge.errors import ByotError
from byot_edge.manifest import LOGITS
from byot_edge.models import MultiExitNet

if TYPE_CHECKING:
    import onnx

# Opset 18: the torch.export-based exporter's lowest, read by ONNX Runtime >= 1.14 and by
# every TensorRT 10 parser (10.3 on JetPack 6 reads opsets 9..20).
DEFAULT_OPSET = 18
MIN_OPSET = 13  # the oldest accepted: older ones lack ops this graph uses, or are untested
INPUT = "image"
BATCH_AXIS = "batch"
EXPORTERS = ("auto", "dynamo", "torchscript")
Exporter = Literal["auto", "dynamo", "torchscript"]


def section_name(k: int) -> str:
    return f"section{k}"


def _exit_logits(k: int) -> str:
    return f"logits{k}"  # only inside the whole graph; every written file calls it "logits"


class _Whole(nn.Module):
    """Outputs (section1..section{K-1}, logits1..logitsK): every tensor a file starts or ends at.

    With a float16 model (strongly typed TensorRT builds), every file still takes and returns
    float32: casts sit at the graph's edges, so the runtime's buffers never change type.
    """

    def __init__(self, model: MultiExitNet, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        h = m.stem(x.to(self.dtype))
        sections, logits = [], []
        for section, head in zip(m.sections, m.heads, strict=True):
            out = section(h).float()
            sections.append(out)
            # The rest reads the float32 section output back (a lossless cast for float16),
            # so a segment cut at that tensor holds nothing from before it.
            h = out.to(self.dtype)
            logits.append(head(h)[0].float())
        return (*sections[:-1], *logits)


@dataclass
class Capture:
    """The whole network's ONNX graph and how it was made."""

    model: onnx.ModelProto
    num_exits: int
    exporter: str
    opset: int
    batch: int | None  # None: dynamic batch axis


def capture(model: MultiExitNet, *, batch: int | None, opset: int | None = None,
            exporter: Exporter = "auto", dtype: torch.dtype = torch.float32) -> Capture:
    """Export the whole network once. `auto` tries the torch.export-based exporter (clean
    graphs, the maintained path) and falls back to the TorchScript one if it fails.
    `dtype` float16 exports a half-precision copy (inputs and outputs stay float32)."""
    if exporter not in EXPORTERS:
        raise ByotError(f"unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    opset = opset or DEFAULT_OPSET
    model = model.eval() if dtype == torch.float32 else copy.deepcopy(model).to(dtype).eval()
    k_max = model.num_exits
    outputs = [section_name(k) for k in range(1, k_max)] + [
        _exit_logits(k) for k in range(1, k_max + 1)]
    # A dynamic axis needs an example batch > 1, else the exporter specialises it to 1.
    example = model.example_input(batch or 2).float()
    errors = []
    for name in (("dynamo", "torchscript") if exporter == "auto" else (exporter,)):
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # exporter chatter; failures still raise
                proto = (_dynamo if name == "dynamo" else _torchscript)(
                    _Whole(model, dtype).eval(), example, outputs, batch, opset)
            return Capture(proto, k_max, name, opset, batch)
        except Exception as e:  # exporter failures come in many types
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    raise ByotError(f"could not export {model.config.arch} to ONNX opset {opset} ("
                    + "; ".join(errors) + "); try another --opset or --exporter")


# What `_dynamo` passes to torch.onnx.export: torch 2.4 and 2.5 take `dynamo=True` but not
# all of these (auto then falls back to the TorchScript exporter).
_DYNAMO_ARGUMENTS = ("dynamo", "external_data", "dynamic_shapes", "optimize", "report")


def dynamo_unsupported() -> str | None:
    """Why this torch's `torch.onnx.export` cannot run `_dynamo`, or None."""
    missing = set(_DYNAMO_ARGUMENTS) - set(inspect.signature(torch.onnx.export).parameters)
    if not missing:
        return None
    return (f"the dynamo exporter needs a newer torch (torch {torch.__version__}'s "
            f"torch.onnx.export takes no {', '.join(sorted(missing))}); use --exporter "
            "torchscript (or auto, which falls back to it), or upgrade torch")


def _dynamo(module: nn.Module, example: torch.Tensor, outputs: list[str], batch: int | None,
            opset: int) -> onnx.ModelProto:
    why = dynamo_unsupported()
    if why:
        raise ByotError(why)
    dynamic = None if batch else {"x": {0: torch.export.Dim(BATCH_AXIS)}}
    program = torch.onnx.export(
        module, (example,), None, dynamo=True, external_data=False, input_names=[INPUT],
        output_names=outputs, dynamic_shapes=dynamic, opset_version=opset, optimize=True,
        verbose=False, report=False,
    )
    proto = program.model_proto
    if batch is None:
        _name_batch_axis(proto)
    return proto


def _torchscript(module: nn.Module, example: torch.Tensor, outputs: list[str],
                 batch: int | None, opset: int) -> onnx.ModelProto:
    import onnx

    f = io.BytesIO()
    dynamic = None if batch else {n: {0: BATCH_AXIS} for n in [INPUT, *outputs]}
    torch.onnx.export(module, (example,), f, dynamo=False, input_names=[INPUT],
                      output_names=outputs, dynamic_axes=dynamic, opset_version=opset,
                      do_constant_folding=True)
    return onnx.load_from_string(f.getvalue())


def _name_batch_axis(proto: onnx.ModelProto) -> None:
    """torch.export names the symbolic batch dim (e.g. "s77"); call it "batch" everywhere."""
    graph = proto.graph
    symbol = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol or symbol == BATCH_AXIS:
        return
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = BATCH_AXIS


def truncated(cap: Capture, k: int) -> onnx.ModelProto:
    """Image -> exit k's logits: stages 1..k and branch k only."""
    return _extract(cap, [INPUT], [_exit_logits(k)])


def segment(cap: Capture, k: int) -> onnx.ModelProto:
    """Section k-1's output (the image for k=1) -> (section k's output, exit k's logits);
    the last segment returns the logits only."""
    inputs = [INPUT if k == 1 else section_name(k - 1)]
    outputs = ([section_name(k)] if k < cap.num_exits else []) + [_exit_logits(k)]
    return _extract(cap, inputs, outputs)


def _extract(cap: Capture, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    import onnx
    from onnx.utils import Extractor

    sub = Extractor(cap.model).extract_model(inputs, outputs)
    _rename(sub.graph, outputs[-1], LOGITS)
    sub.ir_version = cap.model.ir_version
    sub.producer_name, sub.producer_version = "byot-edge", _version()
    sub.opset_import.clear()
    sub.opset_import.extend(cap.model.opset_import)
    onnx.checker.check_model(sub, full_check=True)
    return sub


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in [*graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def _version() -> str:
    from byot_edge import __version__

    return __version__


Shape = list[int | str]  # a str is a dynamic axis, e.g. "batch"


def io_specs(proto: onnx.ModelProto) -> tuple[list[tuple[str, Shape]], list[tuple[str, Shape]]]:
    """(name, shape) of the graph's inputs and outputs."""

    def spec(value: onnx.ValueInfoProto) -> tuple[str, Shape]:
        dims = value.type.tensor_type.shape.dim
        return value.name, [d.dim_param if d.dim_param else int(d.dim_value) for d in dims]

    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    return ([spec(v) for v in graph.input if v.name not in inits],
            [spec(v) for v in graph.output])
