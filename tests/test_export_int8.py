"""`export --precision int8`: QDQ files for ONNX Runtime, calibrated on training images.

One tiny model is quantized once (module-scoped, TorchScript capture, 32 calibration images
of the synthetic dataset) and every test reads that folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_checkpoint
from typer.testing import CliRunner

from byot_edge.datasets import synthetic_arrays
from byot_edge.errors import ByotError
from byot_edge.export.checks import CheckReport, failure_message, judge_int8
from byot_edge.export.exporter import export_checkpoint
from byot_edge.manifest import SEGMENT_ONNX, TRUNCATED_ONNX, load_manifest
from byot_edge.runtime.anytime import AnytimeModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TS = {"exporter": "torchscript"}
K = 4  # resnet18's exits
CHAIN_RTOL = 1e-3  # int8 segments chained against the int8 exit file


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", "resnet18")


@pytest.fixture(scope="module")
def int8(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "deploy"
    # An untrained model's logits are nearly tied, so its agreement bound is loose; the
    # trained CIFAR-10 model reaches 95-99% (docs/int8.md).
    manifest, reports = export_checkpoint(
        ckpt, out, segments=True, precision="int8", calibration_images=32,
        data_dir=out.parent, dataset="synthetic", int8_agreement=0.5, **TS)
    return out, manifest, reports


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _inputs(n: int, seed: int) -> np.ndarray:
    images = synthetic_arrays(n, seed=seed).images.astype(np.float32)
    return np.ascontiguousarray((images / 255 - 0.5) / 0.25)  # the checkpoint's mean/std


def test_every_file_is_int8_qdq(int8):
    out, manifest, _ = int8
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(
        [f"exit{k}.int8.onnx" for k in range(1, K + 1)]
        + [f"segment{k}.int8.onnx" for k in range(1, K + 1)])  # no fp32 file left behind
    for k in range(1, K + 1):
        for kind in (TRUNCATED_ONNX, SEGMENT_ONNX):
            proto = onnx.load(manifest.file_path(k, kind))
            ops = {n.op_type for n in proto.graph.node}
            assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
            int8_weights = [i for i in proto.graph.initializer
                            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
            assert int8_weights, "conv weights are stored as int8"
            # Per-channel: one weight scale per output channel.
            scales = {i.name: i for i in proto.graph.initializer}
            dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] == int8_weights[0].name]
            assert scales[dq[0].input[1]].dims == [int8_weights[0].dims[0]]
            # The runtime's buffers stay float32 at every file's edges.
            for value in [*proto.graph.input, *proto.graph.output]:
                assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
            assert meta["byot_edge.precision"] == "int8"


def test_manifest_records_precision_and_calibration(int8, ckpt):
    out, _, _ = int8
    manifest = load_manifest(out)
    hashes = set()
    for e in manifest.exits:
        for kind in (TRUNCATED_ONNX, SEGMENT_ONNX):
            f = e.files[kind]
            assert f.precision == "int8"
            cal = f.calibration
            assert cal["split"] == "train" and cal["images"] == 32
            assert cal["dataset"] == "synthetic" and cal["scheme"]["per_channel"] is True
            assert cal["scheme"]["format"] == "QDQ" and cal["scheme"]["activations"] == "uint8"
            hashes.add(cal["sha256"])
    assert len(hashes) == 1  # one calibration set for every file
    assert manifest.weights.precision == "fp32"


def test_old_manifest_without_precision_loads_as_fp32(int8, tmp_path):
    out, _, _ = int8
    d = json.loads((out / "manifest.json").read_text())
    for e in d["exits"]:
        for f in e["files"].values():
            del f["precision"], f["calibration"]
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    old = load_manifest(tmp_path / "manifest.json")
    assert old.exit(1).files[TRUNCATED_ONNX].precision == "fp32"
    assert old.exit(1).files[TRUNCATED_ONNX].calibration is None


@pytest.mark.parametrize("batch", [1, 5])
def test_chained_int8_segments_equal_int8_exit_files(int8, batch):
    """Each hand-off tensor has one scale on both sides of the cut, so the cascade computes
    what the exit files compute (module docstring of byot_edge/export/quantize.py)."""
    _, manifest, _ = int8
    x = _inputs(batch, seed=7)
    h = x
    for k in range(1, K + 1):
        outs = _run(manifest.file_path(k, SEGMENT_ONNX), h)
        (exit_logits,) = _run(manifest.file_path(k, TRUNCATED_ONNX), x)
        err = np.abs(outs[-1] - exit_logits).max() / np.abs(exit_logits).max()
        assert err <= CHAIN_RTOL, f"segment chain vs exit{k}.int8.onnx: {err:.2e}"
        h = outs[0]


def test_export_check_reports_agreement_and_error(int8):
    _, _, reports = int8
    q = [r for r in reports if r.kind in ("int8_exit", "int8_segment")]
    assert len(q) == 2 * K and all(r.passed for r in q)
    for r in q:
        assert r.samples > 0 and r.min_agreement == 0.5
        assert 0.5 <= r.top1_agreement <= 1 and r.max_rel > 0  # int8 is not exact
    assert all("chained segments" in r.note for r in q if r.kind == "int8_segment")
    # The fp32 cuts were checked against PyTorch first, as in every export.
    assert sum(r.kind == "exit" and r.max_rel <= 1e-4 for r in reports) == K


def test_agreement_below_the_bound_fails_with_a_clear_message():
    ref = np.eye(4, dtype=np.float32)
    got = ref[[1, 0, 2, 3]]  # half the top-1 answers differ
    from byot_edge.export.checks import compare

    report = judge_int8(compare("exit1.int8.onnx", 1, "int8_exit", got, ref, 1.0), 0.9)
    assert not report.passed and report.top1_agreement == 0.5
    msg = failure_message([report])
    assert "50.0% < 90.0%" in msg and "--calibration-images" in msg
    assert judge_int8(CheckReport("f", 1, "int8_exit", "onnxruntime", True, 4, 1.0, 1.0, 0.95),
                      0.9).passed


def test_runtime_serves_the_int8_folder(int8):
    out, manifest, _ = int8
    model = AnytimeModel.load(out, threads=1)
    x = _inputs(3, seed=3)
    for k in (1, K):
        (want,) = _run(manifest.file_path(k, TRUNCATED_ONNX), x)
        got = model.predict(x, exit=k)
        assert [p.index for p in got] == want.argmax(1).tolist()
    # The cascade runs the int8 segments: exit 1 never confident enough, exits 2 and 3
    # off, so segments 2..4 run as one span the runtime joins out of the int8 files.
    cascade = model.predict(x, threshold=[1.0, 2.0, 2.0])
    (deepest,) = _run(manifest.file_path(K, TRUNCATED_ONNX), x)
    assert [p.exit for p in cascade] == [K] * len(x)
    assert [p.index for p in cascade] == deepest.argmax(1).tolist()
    assert model.backend.has("span2-4")


@pytest.mark.parametrize(("kw", "match"), [
    ({"precision": "int8", "calibration_images": 0, "data_dir": "."}, "--calibration-images"),
    ({"precision": "int8", "calibration_images": 10**6, "data_dir": "."}, "more than"),
    ({"precision": "int8"}, "--data-dir"),
    ({"precision": "int8", "formats": ("onnx", "trt"), "data_dir": "."}, "two folders"),
    ({"precision": "fp16"}, "--format trt"),
    ({"calibration_images": 8}, "only apply with --precision int8"),
    ({"precision": "int8", "int8_agreement": 2.0, "data_dir": "."}, "--int8-agreement"),
])
def test_bad_int8_inputs_are_clear_errors(ckpt, tmp_path, kw, match):
    with pytest.raises(ByotError, match=match):
        export_checkpoint(ckpt, tmp_path / "d", dataset="synthetic", **{**TS, **kw})
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_cli_int8_bad_calibration_count(ckpt, tmp_path):
    from byot_edge.cli import app

    result = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "d"),
                                      "--precision", "int8", "--calibration-images", "0",
                                      "--data-dir", str(tmp_path), "--dataset", "synthetic"])
    assert result.exit_code != 0
    assert "--calibration-images must be >= 1" in result.output


def test_int8_into_an_fp32_folder_is_refused_when_files_would_mix(ckpt, tmp_path):
    out = tmp_path / "d"
    export_checkpoint(ckpt, out, exits=[1, 2], **TS)
    with pytest.raises(ByotError, match="several precisions"):
        export_checkpoint(ckpt, out, exits=[1], precision="int8", calibration_images=8,
                          data_dir=tmp_path, dataset="synthetic", int8_agreement=0.0, **TS)
    assert load_manifest(out).exit(1).files[TRUNCATED_ONNX].precision == "fp32"
    assert not list(out.glob("*.int8.onnx"))


def test_static_batch_int8_calibrates_and_checks_in_whole_batches(ckpt, tmp_path):
    manifest, reports = export_checkpoint(
        ckpt, tmp_path / "d", exits=[2], batch=4, precision="int8", calibration_images=10,
        data_dir=tmp_path, dataset="synthetic", int8_agreement=0.0, **TS)
    (q,) = [r for r in reports if r.kind == "int8_exit"]
    assert q.samples == 256  # 256 held-out images are 64 whole batches of 4
    assert manifest.exit(2).files[TRUNCATED_ONNX].inputs[0].shape[0] == 4
    with pytest.raises(ByotError, match="whole batches"):
        export_checkpoint(ckpt, tmp_path / "e", exits=[2], batch=4, precision="int8",
                          calibration_images=3, data_dir=tmp_path, dataset="synthetic", **TS)


def test_reexport_at_another_precision_drops_the_old_latency_profiles(ckpt, tmp_path):
    from byot_edge.manifest import LatencyProfile

    out = tmp_path / "d"
    export_checkpoint(ckpt, out, exits=[2], **TS)
    m = load_manifest(out)
    ms = {"p50": 1.0, "p90": 1.0, "p99": 1.0, "mean": 1.0, "runs": 5}
    # As profiles were written before they recorded a precision: they timed these fp32 files.
    m.latency_profiles = [LatencyProfile.from_dict({
        "backend": backend, "device": "cpu", "batch": 1,
        "exits": [{"exit": k, "truncated": ms} for k in range(1, K + 1)]})
        for backend in ("onnxruntime", "torch")]
    m.save()
    notes: list[str] = []
    manifest, _ = export_checkpoint(ckpt, out, exits=[2], precision="int8",
                                    calibration_images=8, data_dir=tmp_path,
                                    dataset="synthetic", int8_agreement=0.0,
                                    progress=notes.append, **TS)
    # onnxruntime now runs int8 files: its fp32 timings are gone, and the caller is told;
    # torch still runs the fp32 weights, so its profile stays, saying so from now on.
    assert [(p.backend, p.precision) for p in manifest.latency_profiles] == [("torch", "fp32")]
    assert load_manifest(out).latency_profiles == manifest.latency_profiles
    assert any("onnxruntime at batch 1 timed fp32 files, now int8" in n for n in notes)
