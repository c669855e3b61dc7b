"""A runtime backend whose artifacts are models on the same Triton server, called with BLS.

With it, `AnytimeModel` runs inside Triton's Python backend unchanged: segment after
segment, compacting the batch between them, each segment a request to that segment's own
model (and so to its dynamic batcher, where the survivors of concurrent requests meet).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.manifest import SEGMENT_ONNX, SEGMENT_TRT, Manifest
from byot_edge.runtime.backends.base import (
    SEGMENT,
    ArtifactIO,
    Backend,
    io_from_entry,
    parse_artifact,
)
from byot_edge.runtime.backends.base import parse_span as _parse_span
from byot_edge.runtime.backends.devices import cpu_name, gpu_name


class TritonModelError(RuntimeError):
    """A segment model answered with an error: the server's fault, not the client's."""


def device_name(backend: str) -> str:
    """The device string the runtime backend would report, so a budget finds the latency
    profile measured for it."""
    return f"cuda ({gpu_name()})" if backend == "tensorrt" else f"cpu ({cpu_name()})"


class TritonBLSBackend(Backend):
    name = "triton"
    joins_segments = True  # the repository holds the spans it wrote as models of their own

    def __init__(self, manifest: Manifest, models: Mapping[str, str], pb_utils: Any,
                 backend: str = "onnxruntime") -> None:
        super().__init__(manifest)
        self._models = dict(models)  # artifact -> Triton model name
        self._pb = pb_utils
        # Latency profiles are looked up by the backend that runs the segment files.
        self.name = backend  # type: ignore[misc]
        self._kind = SEGMENT_TRT if backend == "tensorrt" else SEGMENT_ONNX
        # The segment models are the manifest's segment files of that kind (int8 ones for an
        # int8 folder): what the runtime's precision warnings read (files_precision).
        self.file_kinds = {SEGMENT: self._kind}  # type: ignore[misc]
        self._device = device_name(backend)
        self._outputs: dict[str, list[str]] = {}

    @property
    def device(self) -> str:
        return self._device


    def _provides(self, artifact: str) -> bool:
        return artifact in self._models

    def _load(self, artifact: str) -> ArtifactIO:
        if artifact not in self._models:
            raise ByotError(f"the model repository has no model for {artifact}; write it again "
                            "with `byot-edge triton-repo`")
        span = _parse_span(artifact)
        first, last = span if span else (parse_artifact(artifact)[1],) * 2
        head = self.manifest.exit(first).files[self._kind]
        tail = self.manifest.exit(last).files[self._kind]
        a, b = io_from_entry(head, artifact), io_from_entry(tail, artifact)
        io = ArtifactIO(a.input, b.logits, b.section)
        self._outputs[artifact] = [io.logits] + ([io.section] if io.section else [])
        return io

    def _run(self, artifact: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb, model, outputs = self._pb, self._models[artifact], self._outputs[artifact]
        request = pb.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[pb.Tensor(name, np.ascontiguousarray(x)) for name, x in inputs.items()])
        response = request.exec()
        if response.has_error():
            raise TritonModelError(f"model {model}: {response.error().message()}")
        return {name: pb.get_output_tensor_by_name(response, name).as_numpy()
                for name in outputs}
