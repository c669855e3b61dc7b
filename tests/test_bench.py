from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from byot_edge.bench import parse_tegrastats_power, run_bench, write_report
from byot_edge.cli import app
from byot_edge.errors import ByotError
from byot_edge.export.exporter import export_checkpoint
from tests.conftest import make_checkpoint

TINY = {"warmup": 1, "runs": 3, "max_seconds": 0.5}


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    ckpt = make_checkpoint(root / "ckpt.pt", dataset="cifar10")
    export_checkpoint(ckpt, root / "deploy", segments=True, exporter="torchscript")
    return root / "deploy"


def test_bench_latency_json_csv_and_plots(deploy, tmp_path):
    report = run_bench(deploy / "manifest.json", ["onnxruntime", "torch"], [1, 4], **TINY)
    # every exit and every segment, per backend and batch
    assert len(report.latency) == 2 * 2 * 4 * 2
    for r in report.latency:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.images_per_s == pytest.approx(r.batch / (r.p50_ms / 1e3))
        if r.artifact.startswith("exit"):
            assert r.flops > 0 and r.gflops_per_s > 0
    paths = write_report(report, tmp_path)
    names = {p.name for p in paths}
    assert {"bench.json", "latency.csv", "latency.png"} <= names
    for p in paths:
        assert p.stat().st_size > 0
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((tmp_path / "bench.json").read_text())
    assert set(d) >= {"manifest", "model", "machine", "latency", "accuracy", "created"}
    assert set(d["latency"][0]) >= {"backend", "device", "batch", "artifact", "p50_ms", "p90_ms",
                                    "p99_ms", "images_per_s", "gflops_per_s"}
    header = (tmp_path / "latency.csv").read_text().splitlines()[0]
    assert "p99_ms" in header


def test_bench_accuracy_with_data(deploy, cifar_slice, tmp_path):
    report = run_bench(deploy / "manifest.json", ["onnxruntime"], [1], data_dir=cifar_slice,
                       limit=40, eval_batch=8, **TINY)
    whats = [a.what for a in report.accuracy]
    assert whats == ["exit 1", "exit 2", "exit 3", "exit 4"]  # no thresholds calibrated yet
    for a in report.accuracy:
        assert 0 <= a.accuracy <= 1 and a.ms_per_image > 0
        assert sum(a.exit_share) == pytest.approx(1)
    paths = write_report(report, tmp_path)
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and len(paths) == 5


def test_bench_refuses_tampered_or_missing_files(deploy, tmp_path):
    import shutil

    copy = tmp_path / "deploy"
    shutil.copytree(deploy, copy)
    data = bytearray((copy / "exit2.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "exit2.onnx").write_bytes(bytes(data))
    with pytest.raises(ByotError, match=r"exit2\.onnx.*sha256.*re-export"):
        run_bench(copy / "manifest.json", ["onnxruntime"], [1], **TINY)
    (copy / "exit2.onnx").unlink()
    r = CliRunner().invoke(app, ["bench", str(copy / "manifest.json"), "--runs", "3",
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "missing" in r.output and "Traceback" not in r.output


def test_bench_skips_unavailable_backends_and_rejects_unknown(deploy):
    with pytest.raises(ByotError, match="onnxruntime, tensorrt, torch"):
        run_bench(deploy / "manifest.json", ["tflite"], [1], **TINY)


def test_tegrastats_power_lines():
    orin = ("RAM 2448/7620MB (lfb 1x4MB) CPU [2%@729,1%@729] GR3D_FREQ 0% "
            "VDD_IN 5071mW/5071mW VDD_CPU_GPU_CV 482mW/482mW")
    xavier = "RAM 1913/7772MB CPU [1%@1190] GR3D_FREQ 0% POM_5V_IN 3218/3218 POM_5V_GPU 0/0"
    assert parse_tegrastats_power(orin) == pytest.approx(5.071)
    assert parse_tegrastats_power(xavier) == pytest.approx(3.218)
    assert parse_tegrastats_power("RAM 1/2MB CPU [1%@1]") is None
