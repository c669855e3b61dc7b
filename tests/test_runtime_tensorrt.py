"""The TensorRT backend without a GPU: install hints and refusing foreign engines.

Running an engine needs a CUDA GPU and TensorRT 10; these tests cover what is decided
before that: which library is missing, and whether an engine's build record matches.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from byot_edge.errors import ByotError
from byot_edge.fileio import sha256_file
from byot_edge.manifest import (
    ExitEntry,
    FileEntry,
    InputSpec,
    Manifest,
    TensorSpec,
)
from byot_edge.runtime.backends import get_backend
from byot_edge.runtime.backends import tensorrt as trt_backend
from byot_edge.runtime.backends.tensorrt import EngineEnv, engine_mismatches, normalise_cc

HERE = EngineEnv("10.3.0", "NVIDIA A100-SXM4-80GB", "8.0")
RECORD = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA A100-SXM4-80GB",
          "compute_capability": "8.0", "precision": "fp16", "batch_range": [1, 32]}


def engine_manifest(tmp_path: Path, record: dict | None) -> Manifest:
    """Two exits with segment engines whose files do not exist: a refusal must come before
    the file is ever read."""
    def entry(k: int) -> FileEntry:
        inp = "image" if k == 1 else f"section{k - 1}"
        outs = [TensorSpec("logits", ["batch", 10])]
        if k == 1:
            outs.insert(0, TensorSpec("section1", ["batch", 8, 32, 32]))
        return FileEntry(f"segment{k}.engine", "0" * 64, [TensorSpec(inp, ["batch", 3, 32, 32])],
                         outs, record)

    exits = [ExitEntry(k, f"layer{k}", 8, 1, 100, 10, files={"segment_trt": entry(k)})
             for k in (1, 2)]
    return Manifest({"arch": "resnet18", "num_classes": 10}, [str(i) for i in range(10)],
                    InputSpec([3, 32, 32]), exits, root=tmp_path)


def test_record_matching_this_machine_passes() -> None:
    assert engine_mismatches(RECORD, HERE) == []
    assert engine_mismatches({**RECORD, "compute_capability": [8, 0]}, HERE) == []


@pytest.mark.parametrize(("change", "words"), [
    ({"tensorrt_version": "10.0.1"}, "TensorRT 10.0.1, this machine has 10.3.0"),
    ({"compute_capability": "9.0"}, "compute capability 9.0, this GPU is 8.0"),
    ({"gpu_name": "NVIDIA H100"}, "built on NVIDIA H100"),
])
def test_each_mismatch_is_named(change: dict, words: str) -> None:
    problems = engine_mismatches({**RECORD, **change}, HERE)
    assert len(problems) == 1 and words in problems[0]


def test_missing_record_is_a_mismatch() -> None:
    assert engine_mismatches(None, HERE) == ["the manifest has no build record for it"]


def test_compute_capability_spellings() -> None:
    for v in ("8.6", 8.6, [8, 6], (8, 6), "sm_86", "86"):
        assert normalise_cc(v) == "8.6"


def test_missing_tensorrt_gives_the_install_hint(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(ByotError, match=r"tensorrt is not installed.*byot-edge\[tensorrt\]"):
        get_backend("tensorrt", engine_manifest(tmp_path, RECORD))


def test_old_tensorrt_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(ByotError, match=r"TensorRT 8\.6\.1 is too old"):
        get_backend("tensorrt", engine_manifest(tmp_path, RECORD))


def test_tensorrt_for_rtx_versions_are_not_too_old(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # TensorRT for RTX is 1.x with the TensorRT 10 API: engines it built (as CI's are) must
    # get past the version check to the GPU checks, here the missing CUDA bindings.
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", types.SimpleNamespace(__version__="1.2.0"))
    for name in ("cuda", "cuda.bindings", "cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    rtx = {**RECORD, "module": "tensorrt_rtx", "tensorrt_version": "1.2.0"}
    with pytest.raises(ByotError, match=r"cuda-python is not installed"):
        get_backend("tensorrt", engine_manifest(tmp_path, rtx))


def test_missing_cuda_bindings_give_the_install_hint(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    for name in ("cuda", "cuda.bindings", "cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ByotError, match=r"cuda-python is not installed.*pycuda also works"):
        get_backend("tensorrt", engine_manifest(tmp_path, RECORD))


def test_cpu_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ByotError, match=r"CUDA GPU only.*onnxruntime or torch"):
        get_backend("tensorrt", engine_manifest(tmp_path, RECORD), device="cpu")


class FakeCuda:
    def props(self) -> tuple[str, str]:
        return HERE.gpu_name, HERE.compute_capability

    def close(self) -> None:
        pass


class FakeTrt(types.SimpleNamespace):
    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Runtime:
        def __init__(self, logger: object) -> None:
            self.logger = logger


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTrt(__version__=HERE.tensorrt_version)
    monkeypatch.setattr(trt_backend, "_import_trt", lambda module="tensorrt": fake)
    monkeypatch.setattr(trt_backend, "_open_cuda", lambda index: FakeCuda())


@pytest.mark.usefixtures("fake_gpu")
def test_engine_from_another_machine_is_refused_before_reading(tmp_path: Path) -> None:
    foreign = {**RECORD, "tensorrt_version": "10.1.0", "gpu_name": "NVIDIA H100 PCIe",
               "compute_capability": "9.0"}
    backend = get_backend("tensorrt", engine_manifest(tmp_path, foreign))
    assert backend.device == f"cuda ({HERE.gpu_name})"
    with pytest.raises(ByotError) as e:
        backend.load("segment1")
    msg = str(e.value)
    assert "refusing the TensorRT engine for segment1" in msg
    assert "TensorRT 10.1.0" in msg and "compute capability 9.0" in msg and "H100" in msg
    assert "--format trt" in msg


@pytest.mark.usefixtures("fake_gpu")
def test_matching_engine_goes_on_to_the_file_check(tmp_path: Path) -> None:
    backend = get_backend("tensorrt", engine_manifest(tmp_path, RECORD))
    # The record matches, so the next check runs: the (absent) file against the manifest.
    with pytest.raises(ByotError, match="listed in the manifest but missing"):
        backend.load("segment2")
    assert backend.has("segment1") and not backend.has("exit1")


def test_real_cuda_python_without_a_gpu_fails_cleanly() -> None:
    pytest.importorskip("cuda.bindings")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ByotError, match=r"CUDA call failed.*nvidia-smi"):
        trt_backend._open_cuda(0)


def test_ahead_of_time_rtx_engines_are_matched_on_compute_capability_only() -> None:
    from byot_edge.runtime.backends.tensorrt import EngineEnv, engine_mismatches

    env = EngineEnv("1.7.1.116", "NVIDIA GeForce RTX 4090", "8.9")
    record = {"module": "tensorrt_rtx", "tensorrt_version": "1.7.1.116", "gpu_name": None,
              "compute_capability": "8.9", "ahead_of_time": True}
    assert engine_mismatches(record, env) == []
    assert engine_mismatches({**record, "compute_capability": "8.6"}, env)
    assert engine_mismatches({**record, "gpu_name": "NVIDIA RTX A2000"}, env)


# --- the device a server's inference thread runs on (issue 27, item 10) -------------------
# CUDA's current device (runtime API) and context stack (driver API) belong to each host
# thread, and a new thread starts on device 0. These fakes keep them per thread as CUDA
# does and record the device every piece of work ran on. Not measured on a GPU.


class _Record:
    """The device current on the calling thread, as each fake sees it."""

    def __init__(self, driver_api: bool) -> None:
        self.driver_api = driver_api
        self.tls = threading.local()
        self.work: list[tuple[str, int | None]] = []

    @property
    def device(self) -> int | None:
        if self.driver_api:  # the context on top of this thread's stack (none: empty)
            stack = self.stack()
            return stack[-1] if stack else None
        return getattr(self.tls, "device", 0)  # the runtime API: device 0 until set

    def stack(self) -> list[int]:
        if not hasattr(self.tls, "stack"):
            self.tls.stack = []
        return self.tls.stack

    def did(self, what: str) -> None:
        self.work.append((what, self.device))


class FakeCudart:
    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, record: _Record) -> None:
        self.r = record
        self._buffers: list[ctypes.Array] = []

    def cudaGetDevice(self):
        return 0, self.r.device

    def cudaSetDevice(self, index):
        self.r.tls.device = index
        return (0,)

    def cudaGetDeviceProperties(self, index):
        return 0, types.SimpleNamespace(name=b"Fake GPU", major=8, minor=0)

    def cudaGetErrorName(self, err):
        return 0, b"cudaErrorFake"

    def cudaStreamCreate(self):
        self.r.did("stream")
        return 0, 7

    def cudaMalloc(self, nbytes):
        self.r.did("malloc")
        return 0, 4096 * (len(self.r.work) + 1)

    def cudaMallocHost(self, nbytes):
        self.r.did("malloc host")
        self._buffers.append(ctypes.create_string_buffer(nbytes))
        return 0, ctypes.addressof(self._buffers[-1])

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self.r.did("copy")
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self.r.did("sync")
        return (0,)

    def cudaFree(self, ptr):
        self.r.did("free")
        return (0,)

    def cudaFreeHost(self, ptr):
        self.r.did("free host")
        return (0,)

    def cudaStreamDestroy(self, stream):
        self.r.did("stream destroy")
        return (0,)


class FakeDriver:
    """pycuda.driver: a context stack per thread."""

    def __init__(self, record: _Record) -> None:
        r = self.r = record
        stack = record.stack

        class Context:
            def __init__(self, index: int) -> None:
                self.index = index

            def push(self) -> None:
                stack().append(self.index)

            @staticmethod
            def pop() -> None:
                stack().pop()

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            def retain_primary_context(self) -> Context:
                return Context(self.index)

            def name(self) -> str:
                return "Fake GPU"

            def compute_capability(self) -> tuple[int, int]:
                return 8, 0

        class Stream:
            handle = 7

            def __init__(self) -> None:
                r.did("stream")

            def synchronize(self) -> None:
                r.did("sync")

        self.Context, self.Device, self.Stream = Context, Device, Stream

    def init(self) -> None:
        pass

    def mem_alloc(self, nbytes: int) -> int:
        self.r.did("malloc")
        return 4096

    def pagelocked_empty(self, shape, dtype):
        self.r.did("malloc host")
        return np.empty(shape, dtype)

    def memcpy_htod_async(self, dst, src, stream) -> None:
        self.r.did("copy")

    def memcpy_dtoh_async(self, dst, src, stream) -> None:
        self.r.did("copy")


def fake_tensorrt(record: _Record) -> types.SimpleNamespace:
    """An engine image -> logits ([batch, 10]), batches 1..8, that records where it ran."""
    class Mode:
        INPUT, OUTPUT = 1, 2

    class Context:
        def __init__(self) -> None:
            record.did("execution context")
            self.batch = 1

        def set_input_shape(self, name, shape) -> None:
            self.batch = shape[0]

        def get_tensor_shape(self, name):
            return (self.batch, 3, 4, 4) if name == "image" else (self.batch, 10)

        def set_tensor_address(self, name, ptr) -> None:
            pass

        def execute_async_v3(self, stream) -> bool:
            record.did("execute")
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("image", "logits")[i]

        def get_tensor_mode(self, name):
            return Mode.INPUT if name == "image" else Mode.OUTPUT

        def get_tensor_profile_shape(self, name, profile):
            return [(1, 3, 4, 4), (4, 3, 4, 4), (8, 3, 4, 4)]

        def get_tensor_dtype(self, name):
            return "float32"

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data):
            record.did("deserialise")
            return Engine()

    return types.SimpleNamespace(
        __version__=HERE.tensorrt_version, Logger=FakeTrt.Logger, Runtime=Runtime,
        TensorIOMode=Mode, nptype=lambda dtype: np.float32)


def one_engine_manifest(tmp_path: Path) -> Manifest:
    (tmp_path / "exit1.engine").write_bytes(b"an engine")
    record = {"tensorrt_version": HERE.tensorrt_version, "gpu_name": "Fake GPU",
              "compute_capability": "8.0"}
    entry = FileEntry("exit1.engine", sha256_file(tmp_path / "exit1.engine"),
                      [TensorSpec("image", ["batch", 3, 4, 4])],
                      [TensorSpec("logits", ["batch", 10])], record)
    exits = [ExitEntry(1, "layer1", 8, 1, 100, 10, files={"trt": entry})]
    return Manifest({"arch": "resnet18", "num_classes": 10}, [str(i) for i in range(10)],
                    InputSpec([3, 4, 4]), exits, root=tmp_path)


@pytest.mark.parametrize("bindings", ["cuda-python", "pycuda"])
def test_work_on_another_thread_runs_on_the_backends_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bindings: str) -> None:
    record = _Record(driver_api=bindings == "pycuda")
    monkeypatch.setattr(trt_backend, "_import_trt", lambda module="tensorrt": fake_tensorrt(record))
    cuda = ((lambda i: trt_backend._CudaPython(FakeCudart(record), i)) if bindings == "cuda-python"
            else (lambda i: trt_backend._PyCuda(FakeDriver(record), i)))
    monkeypatch.setattr(trt_backend, "_open_cuda", cuda)
    backend = get_backend("tensorrt", one_engine_manifest(tmp_path), device="cuda:1")
    after: list[int | None] = []
    out: dict[str, np.ndarray] = {}

    def serve() -> None:  # as the server's inference thread: loads lazily, then runs
        out.update(backend.run("exit1", {"image": np.ones((3, 3, 4, 4), np.float32)}))
        after.append(record.device)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    assert out["logits"].shape == (3, 10)
    done = {what for what, _ in record.work}
    assert {"deserialise", "execution context", "malloc", "copy", "execute", "sync"} <= done
    assert [w for w in record.work if w[1] != 1] == []  # all of it on cuda:1
    # The runtime API leaves the thread on cuda:1 (as cudaSetDevice does); the driver API
    # pops the context it pushed.
    assert after == [1 if bindings == "cuda-python" else None]
    backend.close()
    assert [w for w in record.work if w[1] != 1] == []  # freed there too


def test_tritons_instance_device_reaches_the_in_process_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from byot_edge.triton import cascade
    from byot_edge.triton.config import instance_device

    assert instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "2"}) \
        == "cuda:2"
    assert instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) \
        is None
    assert instance_device({}) is None
    seen: dict[str, object] = {}

    class Loaded:
        def warmup(self, batch: int) -> None:
            pass

    def load(path, **kw):
        seen.update(kw)
        return Loaded()

    record = {"mode": "inprocess", "backend": "tensorrt", "manifest": "byot/1/deploy/m.json"}
    monkeypatch.setattr(cascade, "read_record", lambda model_dir: (tmp_path, record))
    monkeypatch.setattr(cascade, "verify_repository", lambda root, rec: None)
    monkeypatch.setattr(cascade.AnytimeModel, "load", staticmethod(load))
    args = {"model_repository": str(tmp_path / "byot"), "model_instance_kind": "GPU",
            "model_instance_device_id": "1"}
    cascade.CascadeModel.from_args(args, pb_utils=None)
    assert seen["device"] == "cuda:1" and seen["backend"] == "tensorrt"
