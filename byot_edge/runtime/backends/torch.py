"""PyTorch eager: the reference backend, rebuilt from the manifest's weights file.

It runs the very modules export traced (`truncate(k)` and `segments()`), so a difference
between it and ONNX Runtime or TensorRT points at the export, not at the model.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.manifest import SEGMENT_ONNX, TRUNCATED_ONNX, Manifest
from byot_edge.runtime.backends.base import (
    EXIT,
    SEGMENT,
    SPAN,
    ArtifactIO,
    Backend,
    artifact_name,
    default_io,
    io_from_entry,
    parse_artifact,
    parse_span,
)
from byot_edge.runtime.backends.devices import cpu_name


class TorchBackend(Backend):
    name = "torch"
    file_kinds = None  # every artifact comes from the one weights file
    joins_segments = True

    def __init__(self, manifest: Manifest, device: str | None = None,
                 threads: int | None = None) -> None:
        super().__init__(manifest)
        import torch

        from byot_edge.models import model_from_config

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        try:
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise ByotError(f"unknown torch device {device!r}; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ByotError("--device cuda was asked for but torch sees no CUDA GPU; use "
                            "--device cpu or install a CUDA build of torch")
        self._dev = dev
        path = manifest.weights_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            config = state["model_config"]
            model = model_from_config(config)
            model.load_state_dict(state["model"])
        except (KeyError, TypeError, RuntimeError, ValueError, OSError, EOFError,
                pickle.UnpicklingError, zipfile.BadZipFile) as e:
            # weights_only=True: a file that names anything but tensors is refused here too
            raise ByotError(f"{path} does not hold weights for this manifest's model "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); re-export "
                            "with `byot-edge export`") from None
        if model.num_exits != manifest.num_exits or (
                config.get("num_classes") != manifest.model.get("num_classes")):
            raise ByotError(f"{path} holds a model with {model.num_exits} exits and "
                            f"{config.get('num_classes')} classes but the manifest has "
                            f"{manifest.num_exits} and {manifest.model.get('num_classes')}; "
                            "re-export with `byot-edge export`")
        self.model = model.to(dev).eval()
        self._segments = self.model.segments()
        self._modules: dict[str, Any] = {}

    @property
    def device(self) -> str:
        if self._dev.type == "cuda":
            return f"cuda ({self._torch.cuda.get_device_name(self._dev)})"
        return f"cpu ({cpu_name()})"

    def _load(self, artifact: str) -> ArtifactIO:
        kind, k = parse_artifact(artifact)
        if kind == SPAN:
            first, last = parse_span(artifact)  # type: ignore[misc]
            self._modules[artifact] = self.model.span(first, last)
            head = self.load(artifact_name(SEGMENT, first))
            tail = self.load(artifact_name(SEGMENT, last))
            return ArtifactIO(head.input, tail.logits, tail.section)
        self._modules[artifact] = (self.model.truncate(k) if kind == EXIT
                                   else self._segments[k - 1])
        # Same tensor names as the ONNX files when the manifest has them.
        entry = self.manifest.exit(k).files.get(TRUNCATED_ONNX if kind == EXIT else SEGMENT_ONNX)
        return (io_from_entry(entry, artifact) if entry
                else default_io(kind, k, self.manifest.num_exits))

    def _run(self, artifact: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        io = self._io[artifact]
        x = torch.from_numpy(np.ascontiguousarray(inputs[io.input])).to(self._dev)
        with torch.inference_mode():
            out = self._modules[artifact](x)
        if isinstance(out, tuple):  # a segment before the last: (section output, logits)
            section, logits = out
            return {io.section or "section": section.cpu().numpy(), io.logits: logits.cpu().numpy()}
        return {io.logits: out.cpu().numpy()}
