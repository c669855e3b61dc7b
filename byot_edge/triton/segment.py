"""One cascade segment as a Triton Python-backend model, run with ONNX Runtime.

Triton's dynamic batcher hands the Python backend a list of requests; they run here as one
batch (concatenated, then split back), which is what batching buys a segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge.errors import ByotError, missing_dependency
from byot_edge.fileio import sha256_file


def _parameter(config: dict[str, Any], key: str, default: str = "") -> str:
    value = config.get("parameters", {}).get(key, {})
    return str(value.get("string_value", default))


class SegmentModel:
    def __init__(self, session: Any, pb_utils: Any) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name
        self.outputs = [o.name for o in session.get_outputs()]
        self._pb = pb_utils

    @classmethod
    def from_args(cls, args: dict[str, str], pb_utils: Any) -> SegmentModel:
        import json

        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_dependency("onnxruntime", extra="onnxruntime",
                                     purpose="by the Python-backend segment models") from None
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        want = _parameter(config, "sha256")
        if want and sha256_file(path) != want:
            raise ByotError(f"{path} does not match the sha256 in its config.pbtxt; write the "
                            "repository again with `byot-edge triton-repo`")
        options = ort.SessionOptions()
        threads = int(_parameter(config, "threads", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(session, pb_utils)

    def run(self, batches: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Each request's outputs, from one run over all of them."""
        sizes = np.cumsum([len(b) for b in batches])[:-1]
        x = batches[0] if len(batches) == 1 else np.concatenate(batches)
        outs = self.session.run(None, {self.input: x})
        per_output = [np.split(o, sizes) for o in outs]
        return [list(parts) for parts in zip(*per_output, strict=True)]

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        pb = self._pb
        batches = [pb.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        return [pb.InferenceResponse(output_tensors=[pb.Tensor(n, np.ascontiguousarray(o))
                                                     for n, o in zip(self.outputs, outs,
                                                                     strict=True)])
                for outs in self.run(batches)]
