"""ONNX Runtime: CPU everywhere; CUDA and TensorRT execution providers when installed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from byot_edge.errors import ByotError, missing_dependency
from byot_edge.manifest import SEGMENT_ONNX, TRUNCATED_ONNX
from byot_edge.runtime.backends.base import (
    EXIT,
    SEGMENT,
    ArtifactIO,
    Backend,
    artifact_name,
    io_from_entry,
    parse_span,
)
from byot_edge.runtime.backends.devices import cpu_name, gpu_name

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise missing_dependency("onnxruntime", extra="onnxruntime",
                                 purpose="for --backend onnxruntime") from None
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    file_kinds: ClassVar[dict[str, str] | None] = {EXIT: TRUNCATED_ONNX, SEGMENT: SEGMENT_ONNX}
    joins_segments = True

    def __init__(self, manifest: Any, device: str | None = None,
                 threads: int | None = None, spin: bool = False) -> None:
        """`threads`: intra-op threads (default: ONNX Runtime's, one per physical core).
        `spin`: whether idle worker threads spin for the next job (ONNX Runtime's own
        default) or sleep (ours): on a 2-core machine shared with busy processes, spinning
        workers took the cores the work needed, up to 9x slower at batch 32 (docs/design.md,
        "The runtime's own time"); with 1 thread there are no workers and it makes no
        difference."""
        super().__init__(manifest)
        self._ort = _import_ort()
        available = self._ort.get_available_providers()
        requested = (device or "auto").lower()
        kind, _, index = requested.partition(":")
        if kind == "auto":
            kind = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if kind == "gpu":
            kind = "cuda"
        if kind not in _PROVIDERS:
            raise ByotError(f"unknown onnxruntime device {device!r}; choose one of: auto, cpu, "
                            "cuda, cuda:N, tensorrt")
        if _PROVIDERS[kind][0] not in available:
            raise ByotError(f"this onnxruntime has no {_PROVIDERS[kind][0]} (it has "
                            f"{', '.join(available)}); install onnxruntime-gpu for CUDA/TensorRT, "
                            "or use --device cpu")
        self._kind = kind
        self._gpu_index = int(index or 0)
        opts: dict[str, Any] = {"device_id": int(index)} if index else {}
        self._providers: list[Any] = [
            (p, opts) if p != "CPUExecutionProvider" and opts else p for p in _PROVIDERS[kind]
        ]
        self._options = self._ort.SessionOptions()
        if threads:
            self._options.intra_op_num_threads = threads
        for pool in ("intra_op", "inter_op"):
            self._options.add_session_config_entry(f"session.{pool}.allow_spinning",
                                                   "1" if spin else "0")
        self._sessions: dict[str, Any] = {}
        self._active: list[str] = []

    @property
    def device(self) -> str:
        # What the sessions really run on: ORT silently falls back to CPU when CUDA fails.
        provider = self._active[0] if self._active else _PROVIDERS[self._kind][0]
        if provider == "CPUExecutionProvider":
            return f"cpu ({cpu_name()})"
        tag = "cuda" if provider == "CUDAExecutionProvider" else "tensorrt"
        return f"{tag} ({gpu_name(self._gpu_index)})"

    def _load(self, artifact: str) -> ArtifactIO:
        span = parse_span(artifact)
        if span:
            return self._load_span(artifact, *span)
        entry, path = self.file_entry(artifact)
        io = io_from_entry(entry, str(path))
        self._start(artifact, str(path), io, path)
        return io

    def _load_span(self, artifact: str, first: int, last: int) -> ArtifactIO:
        """Segments first..last joined in memory (each file sha256-verified first)."""
        import onnx

        from byot_edge.runtime.backends.onnx_join import join_segments

        ios, protos = [], []
        for k in range(first, last + 1):
            entry, path = self.file_entry(artifact_name(SEGMENT, k))
            ios.append(io_from_entry(entry, str(path)))
            try:
                protos.append(onnx.load(str(path)))
            except Exception as e:  # protobuf's DecodeError and friends
                raise ByotError(f"cannot read {path} ({type(e).__name__}); re-export it with "
                                "`byot-edge export --segments`") from None
        io = ArtifactIO(ios[0].input, ios[-1].logits, ios[-1].section)
        where = f"segments {first}..{last} of {self.manifest.root}"
        self._start(artifact, join_segments(protos).SerializeToString(), io, where)
        return io

    def _start(self, artifact: str, model: str | bytes, io: ArtifactIO, path: object) -> None:
        """A session for `model` (a file path or serialised bytes), checked against `io`."""
        try:
            session = self._ort.InferenceSession(model, self._options,
                                                 providers=self._providers)
        except Exception as e:  # ORT raises its own untyped errors for a corrupt model
            raise ByotError(f"onnxruntime cannot load {path} ({str(e).splitlines()[0][:160]}); "
                            "re-export it with `byot-edge export`") from None
        names_in = [i.name for i in session.get_inputs()]
        names_out = {o.name for o in session.get_outputs()}
        wanted_out = {io.logits} | ({io.section} if io.section else set())
        if names_in != [io.input] or not wanted_out <= names_out:
            raise ByotError(f"{path} has inputs {names_in} and outputs {sorted(names_out)} but "
                            f"the manifest says {[io.input]} and {sorted(wanted_out)}; re-export "
                            "it with `byot-edge export`")
        batch = session.get_inputs()[0].shape[0]
        static = batch if isinstance(batch, int) and batch > 0 else None  # else a named axis
        self._sessions[artifact] = (session, [o.name for o in session.get_outputs()], static)
        self._active = session.get_providers()

    def session(self, artifact: str) -> Any:
        """The onnxruntime.InferenceSession serving `artifact` (loaded if need be), for
        benchmarks that call it bare."""
        self.load(artifact)
        return self._sessions[artifact][0]

    def _run(self, artifact: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session, names, static = self._sessions[artifact]
        feed = inputs if type(inputs) is dict else dict(inputs)  # ORT takes a dict
        if static is not None:
            (name, x), = feed.items()
            if len(x) != static:
                return _in_static_batches(session, names, name, x, static)
        return dict(zip(names, session.run(names, feed), strict=True))

    def close(self) -> None:
        self._sessions.clear()



def _in_static_batches(session: Any, names: list[str], name: str, x: np.ndarray,
                       batch: int) -> dict[str, np.ndarray]:
    """A file exported with a static --batch takes exactly that many samples, and a cascade
    hands each step only the samples still undecided: run whole batches, the last padded
    with zeros, and keep the rows asked for (as the TensorRT backend pads to its profile)."""
    n = len(x)
    padded = -(-n // batch) * batch
    if padded != n:
        x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
    runs = [session.run(names, {name: x[i:i + batch]}) for i in range(0, padded, batch)]
    return {out: np.concatenate([r[j] for r in runs])[:n] for j, out in enumerate(names)}
