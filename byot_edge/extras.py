"""Which pip extra brings each optional library, so a missing one is named with its fix.

The core install (`pip install byot-edge`) holds the CLI, the manifest and the runtime's pure
parts; everything heavy comes with an extra (see pyproject.toml).
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from byot_edge.errors import ByotError, missing_dependency

# top-level module -> the extra that installs it
EXTRA_OF = {
    "torch": "train",
    "torchvision": "train",
    "onnxscript": "train",
    "onnx": "onnxruntime",
    "onnxruntime": "onnxruntime",
    "matplotlib": "plot",
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "prometheus_client": "serve",
    "httpx": "serve",
    "tensorrt": "tensorrt",
    "tensorrt_rtx": "tensorrt",
    "cuda": "tensorrt",
    "pycuda": "pycuda",
    "timm": "timm",
}


def error_for_missing(error: ModuleNotFoundError, purpose: str = "") -> ByotError | None:
    """The one-line error for an optional library that failed to import, or None when the
    missing module is none of ours (a real bug: let it raise)."""
    root = (error.name or "").split(".")[0]
    extra = EXTRA_OF.get(root)
    return missing_dependency(root, extra, purpose) if extra else None


def require(module: str, purpose: str = "") -> ModuleType:
    """`import module`, or a ByotError that names the extra to install."""
    try:
        return import_module(module)
    except ModuleNotFoundError as e:
        err = error_for_missing(e, purpose)
        if err is None:
            raise
        raise err from None


def available(module: str) -> bool:
    """Whether `module` imports here (importing it, since that is the only sure test)."""
    try:
        import_module(module)
    except ModuleNotFoundError:
        return False
    return True
