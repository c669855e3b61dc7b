"""Backends by name: `get_backend("onnxruntime", manifest, device="cpu")`.

Each backend module imports its inference library only when it is created, so the package
imports on a machine without TensorRT, CUDA or even ONNX Runtime.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from byot_edge.errors import ByotError
from byot_edge.manifest import Manifest
from byot_edge.runtime.backends.base import (
    EXIT,
    SEGMENT,
    SPAN,
    ArtifactIO,
    Backend,
    artifact_name,
    parse_artifact,
    parse_span,
    span_name,
)

# name -> "module:class", imported on first use.
_BACKENDS = {
    "onnxruntime": "byot_edge.runtime.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "byot_edge.runtime.backends.tensorrt:TensorRTBackend",
    "torch": "byot_edge.runtime.backends.torch:TorchBackend",
}
_ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt", "pytorch": "torch"}


def list_backends() -> list[str]:
    return list(_BACKENDS)


def canonical_backend(name: str) -> str:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _BACKENDS:
        raise ByotError(f"unknown backend {name!r}; choose one of: {', '.join(_BACKENDS)}")
    return key


def get_backend(name: str, manifest: Manifest, device: str | None = None,
                **options: Any) -> Backend:
    """Create backend `name` for `manifest`; `device` is e.g. "cpu", "cuda", "cuda:1"."""
    module, cls = _BACKENDS[canonical_backend(name)].split(":")
    backend_cls: type[Backend] = getattr(import_module(module), cls)
    return backend_cls(manifest, device=device, **options)  # type: ignore[call-arg]


__all__ = [
    "EXIT",
    "SEGMENT",
    "SPAN",
    "ArtifactIO",
    "Backend",
    "artifact_name",
    "canonical_backend",
    "get_backend",
    "list_backends",
    "parse_artifact",
    "parse_span",
    "span_name",
]
