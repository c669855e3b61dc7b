"""The TensorRT backend without a GPU: install hints and refusing foreign engines.

Running an engine needs a CUDA GPU and TensorRT 10; these tests cover what is decided
before that: which library is missing, and whether an engine's build record matches.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from byot_edge.errors import ByotError
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
