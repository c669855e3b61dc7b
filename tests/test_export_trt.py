"""TensorRT engines built from our ONNX files, with whichever TensorRT imports here.

`pip install tensorrt-rtx` gives a TensorRT-RTX whose builder parses ONNX and serialises
engines on a CPU-only machine, ahead of time for a compute capability; deserializing (and
running) an engine needs a GPU, so without one these tests check what the builder and the
parsed network report, and the records the runtime will rely on.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
from conftest import make_checkpoint
from typer.testing import CliRunner

from byot_edge.errors import ByotError
from byot_edge.export.exporter import export_checkpoint
from byot_edge.export.trt_build import TrtOptions
from byot_edge.export.trt_env import local_gpu
from byot_edge.fileio import sha256_file
from byot_edge.manifest import SEGMENT_TRT, TRUNCATED_TRT, load_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tensorrt():
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return importlib.import_module(name), name
        except ImportError:
            continue
    pytest.skip("neither tensorrt nor tensorrt_rtx imports (pip install tensorrt-rtx builds "
                "engines on a CPU)", allow_module_level=True)


trt, MODULE = _tensorrt()
GPU = local_gpu()
if MODULE == "tensorrt" and GPU is None:
    pytest.skip("tensorrt is installed but there is no GPU to build for (tensorrt-rtx builds "
                "ahead of time without one)", allow_module_level=True)
# Without a GPU, TensorRT-RTX builds ahead of time for a compute capability it supports.
CC = None if GPU else "8.9"
TS = {"exporter": "torchscript"}


def _options(**kw) -> TrtOptions:
    return TrtOptions(module=MODULE, compute_capability=CC, workspace_mb=256, **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", "resnet18")


@pytest.fixture(scope="module")
def fp32_export(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "deploy"
    manifest, reports = export_checkpoint(
        ckpt, out, exits=[2], segments=True, formats=("trt",),
        trt_options=_options(batch_range=(1, 4, 16)), **TS)
    return out, manifest, reports


def _parsed_network(onnx_path: Path):
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.ERROR))
    assert parser.parse_from_file(str(onnx_path))
    return builder, network


def test_engines_for_every_file_with_records(fp32_export):
    out, _, reports = fp32_export
    manifest = load_manifest(out)
    built = {(r.exit, r.kind) for r in reports if r.kind in ("engine", "segment_engine")}
    assert built == {(2, "engine")} | {(k, "segment_engine") for k in (1, 2, 3, 4)}
    assert all(r.passed for r in reports), [r.note for r in reports if not r.passed]
    for k in (1, 2, 3, 4):
        kinds = [TRUNCATED_TRT, SEGMENT_TRT] if k == 2 else [SEGMENT_TRT]
        for kind in kinds:
            entry = manifest.exit(k).files[kind]
            source = manifest.exit(k).files["onnx" if kind == TRUNCATED_TRT else "segment_onnx"]
            assert (out / entry.path).stat().st_size > 0
            assert sha256_file(out / entry.path) == entry.sha256
            rec = entry.engine
            assert rec["module"] == MODULE and rec["tensorrt_version"] == trt.__version__
            assert rec["compute_capability"] == (GPU[1] if GPU else CC)
            assert rec["gpu_name"] == (GPU[0] if GPU else None)
            assert rec["precision"] == "fp32" and rec["batch_range"] == [1, 4, 16]
            assert rec["source"] == {"path": source.path, "sha256": source.sha256}
            assert [t.name for t in entry.inputs] == [t.name for t in source.inputs]
            assert [t.name for t in entry.outputs] == [t.name for t in source.outputs]
            (name, shape), = ((t.name, t.shape) for t in source.inputs)
            assert rec["profile_shapes"][name] == {
                "min": [1, *shape[1:]], "opt": [4, *shape[1:]], "max": [16, *shape[1:]]}


def test_network_parsed_from_our_onnx_is_dynamic(fp32_export):
    out, manifest, _ = fp32_export
    _, network = _parsed_network(out / manifest.exit(2).files["onnx"].path)
    assert network.num_inputs == 1 and network.get_input(0).name == "image"
    assert list(network.get_input(0).shape) == [-1, 3, 32, 32]
    assert [network.get_output(i).name for i in range(network.num_outputs)] == ["logits"]
    _, seg = _parsed_network(out / manifest.exit(3).files["segment_onnx"].path)
    assert [seg.get_output(i).name for i in range(seg.num_outputs)] == ["section3", "logits"]


@pytest.mark.skipif(GPU is None, reason="deserializing an engine needs a CUDA GPU")
def test_engine_reports_profile(fp32_export):
    out, _, _ = fp32_export
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine((out / "exit2.engine").read_bytes())
    assert [list(s) for s in engine.get_tensor_profile_shape("image", 0)] == [
        [1, 3, 32, 32], [4, 3, 32, 32], [16, 3, 32, 32]]


def test_reexport_keeps_engines_of_unchanged_files(ckpt, fp32_export, tmp_path):
    out = Path(shutil.copytree(fp32_export[0], tmp_path / "deploy"))
    manifest, _ = export_checkpoint(ckpt, out, exits=[1], formats=("onnx",), **TS)
    assert set(manifest.exit(2).files) >= {TRUNCATED_TRT, SEGMENT_TRT}  # engines kept
    manifest.file_path(2, TRUNCATED_TRT)  # and still match their sha256
    # exit2.onnx re-exported with a static batch: its old engine no longer stands for it.
    notes: list[str] = []
    manifest, _ = export_checkpoint(ckpt, out, exits=[2], batch=1, progress=notes.append, **TS)
    assert TRUNCATED_TRT not in manifest.exit(2).files
    assert SEGMENT_TRT in manifest.exit(2).files
    assert any("exit2.engine" in n for n in notes)
    if MODULE == "tensorrt":
        assert (fp32_export[0] / "timing.cache").stat().st_size > 0


def test_int8_names_layers_left_in_higher_precision(ckpt, tmp_path):
    manifest, reports = export_checkpoint(
        ckpt, tmp_path / "d", exits=[1], formats=("trt",), data_dir=tmp_path,
        dataset="synthetic", trt_options=_options(precision="int8", calibration_samples=16),
        **TS)
    engine = manifest.exit(1).files[TRUNCATED_TRT]
    rec = engine.engine
    assert rec["precision"] == "int8"
    # Calibrated on training images, as the int8 ONNX files are; the ONNX file stays fp32.
    assert engine.precision == "int8" and engine.calibration["split"] == "train"
    assert engine.calibration["images"] == 16
    assert manifest.exit(1).files["onnx"].precision == "fp32"
    hp = rec["higher_precision"]
    assert hp["int8_layers"] > 0
    # The attention branch's upsample and sigmoid have no int8 kernels here.
    assert {"Resize", "Sigmoid"} <= set(hp["by_op_type"]) and hp["layers"]
    (q,) = [r for r in reports if r.kind == "int8_onnx"]
    # Checked on held-out training images (synthetic data has no val split), unfused.
    assert q.max_rel is not None and q.samples == 256 and "fake-quantized" in q.note


def test_fp16_and_static_batch(ckpt, tmp_path):
    manifest, _ = export_checkpoint(ckpt, tmp_path / "d", exits=[3], batch=2, formats=("trt",),
                                    trt_options=_options(precision="fp16"), **TS)
    rec = manifest.exit(3).files[TRUNCATED_TRT].engine
    assert rec["precision"] == "fp16" and rec["batch_range"] == [2, 2, 2]
    assert rec["strongly_typed"] == (not rec["builder_flags"])
    with pytest.raises(ByotError, match="static"):
        export_checkpoint(ckpt, tmp_path / "e", exits=[3], batch=2, formats=("trt",),
                          trt_options=_options(batch_range=(1, 2, 4)), **TS)


def test_int8_without_data_dir_and_bad_range(ckpt, tmp_path):
    with pytest.raises(ByotError, match="--data-dir"):
        export_checkpoint(ckpt, tmp_path / "d", formats=("trt",),
                          trt_options=_options(precision="int8"), **TS)
    with pytest.raises(ByotError, match="min <= opt <= max"):
        export_checkpoint(ckpt, tmp_path / "d", formats=("trt",),
                          trt_options=_options(batch_range=(8, 4, 16)), **TS)
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(MODULE != "tensorrt_rtx", reason="ahead-of-time builds are TensorRT-RTX's")
def test_unknown_compute_capability_lists_valid_ones(ckpt, tmp_path):
    with pytest.raises(ByotError, match=r"choose one of: .*8\.9"):
        export_checkpoint(ckpt, tmp_path / "d", formats=("trt",),
                          trt_options=TrtOptions(module=MODULE, compute_capability="1.0"), **TS)


def test_cli_format_trt(ckpt, tmp_path):
    from byot_edge.cli import app

    args = ["export", str(ckpt), "--exit", "1", "--out", str(tmp_path / "d"), "--format", "all",
            "--batch-range", "1,2,4", "--exporter", "torchscript", "--workspace-mb", "128"]
    if CC:
        args += ["--compute-capability", CC]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "exit1.engine" in result.output and "exit1.onnx" in result.output
