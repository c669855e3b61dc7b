"""TensorRT 10 native engines, driven through cuda-python (pycuda where cuda-python is absent).

TensorRT 10 API: `set_input_shape`, `set_tensor_address`, `execute_async_v3`. Each engine
gets its device buffers (sized for the engine's largest batch) and pinned host buffers once,
at load; every run reuses them on the backend's one CUDA stream. A batch larger than the
engine's profile allows is run in chunks.

On `cuda:N`, the device is made current (runtime API) or its context pushed (driver API)
around every load, run and close, on whichever thread does it: a server builds the backend
on one thread and loads engines lazily on its inference thread, whose current device is
0 until set. Tested with fake CUDA modules; not measured on a GPU with N >= 1.

An engine only runs on the TensorRT version and GPU it was built for, so the manifest's
engine record (tensorrt_version, gpu_name, compute_capability) is compared with this
machine before the file is even read, and a mismatch is refused with what to rebuild.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from byot_edge.errors import ByotError, missing_dependency
from byot_edge.manifest import SEGMENT_TRT, TRUNCATED_TRT, Manifest
from byot_edge.runtime.backends.base import (
    EXIT,
    SEGMENT,
    ArtifactIO,
    Backend,
    io_from_entry,
    parse_artifact,
)


@dataclass(frozen=True)
class EngineEnv:
    """What an engine is tied to: the TensorRT version and the GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.6"


def normalise_cc(value: Any) -> str:
    """8.6, "8.6", [8, 6], "sm_86", "86" -> "8.6"."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).lower().removeprefix("sm_").removeprefix("sm")
    if "." not in text and text.isdigit() and len(text) >= 2:
        return f"{text[:-1]}.{text[-1]}"
    return text


def engine_mismatches(record: Mapping[str, Any] | None, env: EngineEnv) -> list[str]:
    """What differs between an engine's build record and this machine (empty: it may run)."""
    if not record:
        return ["the manifest has no build record for it"]
    out = []
    built_trt = str(record.get("tensorrt_version", "?"))
    if built_trt != env.tensorrt_version:
        out.append(f"built with TensorRT {built_trt}, this machine has {env.tensorrt_version}")
    built_cc = normalise_cc(record.get("compute_capability", "?"))
    if built_cc != normalise_cc(env.compute_capability):
        out.append(f"built for compute capability {built_cc}, this GPU is "
                   f"{normalise_cc(env.compute_capability)}")
    built_gpu = record.get("gpu_name", "?")
    # Ahead-of-time builds (TensorRT for RTX without a GPU) target a compute capability, not
    # a GPU model: for them the capability check above is the whole check.
    if built_gpu is not None and str(built_gpu) != env.gpu_name:
        out.append(f"built on {built_gpu}, this GPU is {env.gpu_name}")
    return out


def check_engine(record: Mapping[str, Any] | None, env: EngineEnv, what: str,
                 manifest_root: Any) -> None:
    problems = engine_mismatches(record, env)
    if problems:
        raise ByotError(f"refusing the TensorRT engine for {what}: {'; '.join(problems)}. "
                        f"Rebuild the engines on this machine with `byot-edge export CHECKPOINT "
                        f"--out {manifest_root} --format trt`, or use --backend onnxruntime")


def _import_trt(module: str = "tensorrt") -> Any:
    """`tensorrt`, or `tensorrt_rtx` for engines built by TensorRT for RTX (same runtime API)."""
    from importlib import import_module

    try:
        tensorrt = import_module(module)
    except ImportError:
        raise missing_dependency(module.replace("_", "-"), extra="tensorrt",
                                 purpose="for --backend tensorrt") from None
    # TensorRT for RTX numbers its releases 1.x and speaks the TensorRT 10 API.
    major = int(str(tensorrt.__version__).split(".")[0])
    if module == "tensorrt" and major < 10:
        raise ByotError(f"TensorRT {tensorrt.__version__} is too old: this backend needs the "
                        "TensorRT 10 API; install it with: pip install 'byot-edge[tensorrt]'")
    return tensorrt


def _engine_module(manifest: Manifest) -> str:
    """The TensorRT module the manifest's engines were built with (recorded by export)."""
    for entry in manifest.exits:
        for kind in (TRUNCATED_TRT, SEGMENT_TRT):
            record = entry.files[kind].engine if kind in entry.files else None
            if record and record.get("module"):
                return str(record["module"])
    return "tensorrt"


class _CudaPython:
    """Memory and stream through cuda-python's runtime bindings.

    The CUDA runtime's current device belongs to the calling host thread, and a thread
    starts on device 0: a server builds the backend on one thread and runs it on another,
    so every piece of work sets device N on the thread doing it (`current`)."""

    def __init__(self, cudart: Any, device_index: int) -> None:
        self.rt = cudart
        self.device_index = device_index
        self._device: list[int] = []
        self._host: list[int] = []
        with self.current():
            self.stream = self._call(cudart.cudaStreamCreate())

    @contextmanager
    def current(self) -> Iterator[None]:
        """Device N current on this thread for the block. Left current after it, as
        cudaSetDevice leaves it (other CUDA users set their own device per call): on a
        thread already there, one cudaGetDevice per run."""
        if int(self._call(self.rt.cudaGetDevice())) != self.device_index:
            self._call(self.rt.cudaSetDevice(self.device_index))
        yield

    def _call(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            _, name = self.rt.cudaGetErrorName(err)
            name = name.decode() if isinstance(name, bytes) else name
            raise ByotError(f"CUDA call failed ({name}); check the GPU and driver with "
                            "nvidia-smi, or use --backend onnxruntime")
        return rest[0] if len(rest) == 1 else rest

    def props(self) -> tuple[str, str]:
        p = self._call(self.rt.cudaGetDeviceProperties(self.device_index))
        name = p.name.decode().rstrip("\x00") if isinstance(p.name, bytes) else str(p.name)
        return name, f"{p.major}.{p.minor}"

    def malloc(self, nbytes: int) -> int:
        ptr = int(self._call(self.rt.cudaMalloc(nbytes)))
        self._device.append(ptr)
        return ptr

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr = int(self._call(self.rt.cudaMallocHost(nbytes)))  # pinned: async copies
        self._host.append(ptr)
        buf = (ctypes.c_byte * nbytes).from_address(ptr)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def htod(self, dst: int, src: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self.stream))

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self.stream))

    def sync(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream))

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def close(self) -> None:
        with self.current():
            for ptr in self._device:
                self.rt.cudaFree(ptr)
            for ptr in self._host:
                self.rt.cudaFreeHost(ptr)
            self._device.clear()
            self._host.clear()
            self.rt.cudaStreamDestroy(self.stream)


class _PyCuda:
    """The same through pycuda, for machines that have it rather than cuda-python. The
    driver API's context stack is per thread too: the device's primary context is pushed
    for each piece of work on whichever thread does it, and popped after."""

    def __init__(self, driver: Any, device_index: int) -> None:
        driver.init()
        self.drv = driver
        self.dev = driver.Device(device_index)
        self.ctx = self.dev.retain_primary_context()
        self._keep: list[Any] = []
        with self.current():
            self.stream = driver.Stream()

    @contextmanager
    def current(self) -> Iterator[None]:
        self.ctx.push()
        try:
            yield
        finally:
            self.drv.Context.pop()

    def props(self) -> tuple[str, str]:
        major, minor = self.dev.compute_capability()
        return self.dev.name(), f"{major}.{minor}"

    def malloc(self, nbytes: int) -> int:
        mem = self.drv.mem_alloc(nbytes)
        self._keep.append(mem)
        return int(mem)

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self.drv.pagelocked_empty(shape, dtype)

    def htod(self, dst: int, src: np.ndarray) -> None:
        self.drv.memcpy_htod_async(dst, src, self.stream)

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        self.drv.memcpy_dtoh_async(dst, src, self.stream)

    def sync(self) -> None:
        self.stream.synchronize()

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def close(self) -> None:
        with self.current():
            self._keep.clear()
            self.stream = None


def _open_cuda(device_index: int) -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            cudart = None
    if cudart is not None:
        return _CudaPython(cudart, device_index)
    try:
        import pycuda.driver as driver
    except ImportError:
        raise missing_dependency("cuda-python", extra="tensorrt",
                                 purpose="for --backend tensorrt (pycuda also works)") from None
    return _PyCuda(driver, device_index)


@dataclass
class _Tensor:
    name: str
    is_input: bool
    dtype: np.dtype
    device: int  # device pointer, sized for the largest batch
    host: np.ndarray  # pinned, [max_batch, ...]


@dataclass
class _Engine:
    engine: Any
    context: Any
    tensors: list[_Tensor]
    min_batch: int
    max_batch: int


class TensorRTBackend(Backend):
    name = "tensorrt"
    file_kinds: ClassVar[dict[str, str] | None] = {EXIT: TRUNCATED_TRT, SEGMENT: SEGMENT_TRT}
    concurrent_runs: ClassVar[bool] = False  # one execution context and stream per engine

    def __init__(self, manifest: Manifest, device: str | None = None,
                 threads: int | None = None) -> None:
        super().__init__(manifest)  # `threads` is accepted for a uniform CLI; the GPU ignores it
        kind, _, index = (device or "cuda").lower().partition(":")
        if kind not in ("cuda", "gpu"):
            raise ByotError(f"the tensorrt backend runs on a CUDA GPU only (got --device "
                            f"{device}); use --backend onnxruntime or torch for the CPU")
        self._trt = _import_trt(_engine_module(manifest))
        self._cuda = _open_cuda(int(index or 0))
        gpu, cc = self._cuda.props()
        self.env = EngineEnv(str(self._trt.__version__), gpu, cc)
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime = self._trt.Runtime(self._logger)
        self._engines: dict[str, _Engine] = {}
        self._lock = threading.Lock()  # one stream, one context per engine: one run at a time

    @property
    def device(self) -> str:
        return f"cuda ({self.env.gpu_name})"

    def _load(self, artifact: str) -> ArtifactIO:
        kind, k = parse_artifact(artifact)
        entry = self.manifest.exit(k).files.get(self.file_kinds[kind])  # type: ignore[index]
        if entry is not None:  # refuse before reading (and hashing) a foreign engine
            check_engine(entry.engine, self.env, f"{artifact} ({entry.path})", self.manifest.root)
        entry, path = self.file_entry(artifact)
        io = io_from_entry(entry, str(path))
        data = path.read_bytes()
        # Loaded lazily, on whatever thread first runs the artifact (a server's inference
        # thread): the engine and its buffers must land on this backend's device.
        with self._cuda.current():
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise ByotError(f"TensorRT could not deserialise {path}; rebuild it on this "
                                f"machine with `byot-edge export CHECKPOINT --out "
                                f"{self.manifest.root} --format trt`")
            self._engines[artifact] = self._allocate(engine, io, str(path))
        return io

    def _allocate(self, engine: Any, io: ArtifactIO, where: str) -> _Engine:
        trt = self._trt
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [io.input]:
            raise ByotError(f"{where} has inputs {inputs}, the manifest says {[io.input]}; "
                            "rebuild it with `byot-edge export --format trt`")
        lo, _, hi = (tuple(s) for s in engine.get_tensor_profile_shape(io.input, 0))
        context.set_input_shape(io.input, hi)  # size every buffer for the largest batch
        tensors = []
        for name in names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            ptr = self._cuda.malloc(int(np.prod(shape)) * dtype.itemsize)
            context.set_tensor_address(name, ptr)
            tensors.append(_Tensor(name, name == io.input, dtype, ptr,
                                   self._cuda.host_array(shape, dtype)))
        return _Engine(engine, context, tensors, int(lo[0]), int(hi[0]))

    def _run(self, artifact: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        eng = self._engines[artifact]
        (x,) = inputs.values()
        with self._lock, self._cuda.current():
            chunks = [self._run_chunk(eng, x[i:i + eng.max_batch])
                      for i in range(0, len(x), eng.max_batch)]
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def _run_chunk(self, eng: _Engine, x: np.ndarray) -> dict[str, np.ndarray]:
        n = len(x)
        if n < eng.min_batch:  # pad up to the profile's smallest batch
            x = np.concatenate([x, np.zeros((eng.min_batch - n, *x.shape[1:]), x.dtype)])
        inp = next(t for t in eng.tensors if t.is_input)
        host = inp.host[:len(x)]
        host[...] = x.astype(inp.dtype, copy=False)
        eng.context.set_input_shape(inp.name, x.shape)
        self._cuda.htod(inp.device, host)
        if not eng.context.execute_async_v3(self._cuda.stream_handle):
            raise ByotError("TensorRT failed to run the engine; rebuild it with "
                            "`byot-edge export --format trt` or use --backend onnxruntime")
        outs = {}
        for t in eng.tensors:
            if not t.is_input:
                shape = tuple(eng.context.get_tensor_shape(t.name))
                dst = t.host.reshape(-1)[:int(np.prod(shape))].reshape(shape)
                self._cuda.dtoh(dst, t.device)
                outs[t.name] = dst
        self._cuda.sync()
        # Copy out of the pinned buffers: the next run overwrites them.
        return {name: a[:n].astype(np.float32, copy=True) for name, a in outs.items()}

    def close(self) -> None:
        with self._cuda.current():  # engines and contexts are freed on their device
            self._engines.clear()
        self._cuda.close()
