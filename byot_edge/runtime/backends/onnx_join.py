"""Several cascade segments joined into one ONNX graph, for the ONNX Runtime backend (no torch).

A cascade whose exits i..j-1 are switched off runs segments i..j as one "span": sections
i..j and exit j's branch only. The branches of the skipped exits are dropped, and the span
costs one call instead of j-i+1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from byot_edge.errors import ByotError
from byot_edge.manifest import LOGITS

if TYPE_CHECKING:
    import onnx

def join_segments(segments: Sequence[onnx.ModelProto]) -> onnx.ModelProto:
    """Segments i..j (in order) as one graph: sections i..j and exit j's branch only.

    The segment files are cuts of one capture, so their tensor names already agree: section
    k's output is segment k's output and segment k+1's input, and a name two files share is
    one tensor (a constant both cut out, say), kept once.
    """
    import onnx
    from onnx.utils import Extractor

    if len(segments) == 1:
        return segments[0]
    parts = []
    for seg in segments[:-1]:
        section = next((o.name for o in seg.graph.output if o.name != LOGITS), None)
        if section is None:
            raise ByotError("a segment before the last has no section output to chain; "
                            "re-export with `byot-edge export --segments`")
        parts.append(Extractor(seg).extract_model([seg.graph.input[0].name], [section]))
    last = segments[-1]
    parts.append(last)
    nodes: list[onnx.NodeProto] = []
    produced: set[str] = set()
    initializers: dict[str, onnx.TensorProto] = {}
    value_info: dict[str, onnx.ValueInfoProto] = {}
    functions: dict[tuple[str, str], onnx.FunctionProto] = {}
    for part in parts:
        g = part.graph
        for node in g.node:
            if node.output and all(o in produced for o in node.output):
                continue  # the same node, cut into both files
            nodes.append(node)
            produced.update(node.output)
        for t in g.initializer:
            initializers.setdefault(t.name, t)
        for v in [*g.value_info, *g.output]:
            value_info.setdefault(v.name, v)
        for f in part.functions:
            functions.setdefault((f.domain, f.name), f)
    outputs = {o.name for o in last.graph.output}
    graph = onnx.helper.make_graph(
        nodes, f"{parts[0].graph.name}-joined", [parts[0].graph.input[0]], list(last.graph.output),
        initializer=list(initializers.values()),
        value_info=[v for n, v in value_info.items() if n not in outputs])
    joined = onnx.helper.make_model(graph, opset_imports=list(last.opset_import),
                                    functions=list(functions.values()))
    joined.ir_version = last.ir_version
    joined.producer_name, joined.producer_version = last.producer_name, last.producer_version
    onnx.checker.check_model(joined)
    return joined
