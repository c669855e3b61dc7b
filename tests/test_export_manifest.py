"""Export into a folder that already has a manifest, bad inputs, and failed checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_checkpoint
from typer.testing import CliRunner

from byot_edge.errors import ByotError
from byot_edge.export import graph
from byot_edge.export.exporter import export_checkpoint
from byot_edge.fileio import sha256_file
from byot_edge.manifest import (
    SEGMENT_ONNX,
    TRUNCATED_ONNX,
    LatencyProfile,
    Thresholds,
    load_manifest,
)

TS = {"exporter": "torchscript"}  # seconds per export on a small CPU, not tens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", "resnet18")


@pytest.fixture(scope="module")
def exported_1_2(ckpt, tmp_path_factory) -> Path:
    """Exits 1 and 2 exported once; tests copy the folder and export into the copy."""
    out = tmp_path_factory.mktemp("base") / "deploy"
    export_checkpoint(ckpt, out, exits=[1, 2], **TS)
    return out


@pytest.fixture
def deploy(exported_1_2, tmp_path) -> Path:
    return Path(shutil.copytree(exported_1_2, tmp_path / "deploy"))


def _add_calibration(out: Path) -> None:
    m = load_manifest(out)
    m.thresholds = Thresholds("max_softmax", [0.9, 0.8, 0.7], source="test")
    ms = {"p50": 1.0, "p90": 1.0, "p99": 1.0, "mean": 1.0, "runs": 5}
    m.latency_profiles.append(LatencyProfile.from_dict({
        "backend": "onnxruntime", "device": "cpu", "batch": 1,
        "exits": [{"exit": k, "truncated": ms} for k in (1, 2, 3, 4)]}))
    m.save()


def test_reexport_keeps_other_entries(ckpt, deploy):
    out = deploy
    _add_calibration(out)
    first = load_manifest(out).exit(1).files[TRUNCATED_ONNX]

    manifest, _ = export_checkpoint(ckpt, out, exits=[3], segments=True, **TS)
    again = load_manifest(out)
    assert again.to_dict() == manifest.to_dict()
    assert again.exit(1).files[TRUNCATED_ONNX] == first  # the other exit's file is still listed
    assert again.file_path(1, TRUNCATED_ONNX).is_file()  # ... and matches its sha256
    assert set(again.exit(3).files) == {TRUNCATED_ONNX, SEGMENT_ONNX}
    assert set(again.exit(2).files) == {TRUNCATED_ONNX, SEGMENT_ONNX}
    assert again.thresholds is not None and again.thresholds.values == [0.9, 0.8, 0.7]
    assert len(again.latency_profiles) == 1


def test_reexport_of_other_weights_drops_stale_entries(deploy, tmp_path):
    out = deploy
    _add_calibration(out)
    other = make_checkpoint(tmp_path / "other.pt", "resnet18", seed=1)
    notes: list[str] = []
    manifest, _ = export_checkpoint(other, out, exits=[2], progress=notes.append, **TS)
    assert set(manifest.exit(1).files) == set()  # exit1.onnx came from other weights
    assert manifest.thresholds is None
    assert len(manifest.latency_profiles) == 1  # same architecture: latency still applies
    assert any("other weights" in n for n in notes)
    assert load_manifest(out).weights.sha256 == sha256_file(out / "weights.pt")


@pytest.mark.parametrize("bad", [0, 5])
def test_bad_exit_lists_valid_exits(ckpt, tmp_path, bad):
    out = tmp_path / "deploy"
    with pytest.raises(ByotError, match=r"exits 1\.\.4"):
        export_checkpoint(ckpt, out, exits=[bad], **TS)
    assert not out.exists() or not any(out.iterdir())


def _not_ours(tmp_path: Path) -> Path:
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    return path


def _truncated(tmp_path: Path) -> Path:
    good = make_checkpoint(tmp_path / "good.pt", "resnet18")
    path = tmp_path / "truncated.pt"
    path.write_bytes(good.read_bytes()[:5000])
    return path


@pytest.mark.parametrize("make", [_not_ours, _truncated], ids=["not-ours", "truncated"])
def test_bad_checkpoint_is_one_line_error(tmp_path, make):
    result = CliRunner().invoke(_app(), ["export", str(make(tmp_path)), "--out",
                                         str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "checkpoint" in lines[0]


def _break_exit2(real):
    """A graph cutter that gets exit 2's classifier bias wrong, as a buggy export would."""

    def truncated(cap, k):
        proto = real(cap, k)
        if k == 2:
            gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
            init = next(i for i in proto.graph.initializer if i.name == gemm.input[2])
            bias = onnx.numpy_helper.to_array(init) + 1.0
            init.CopyFrom(onnx.numpy_helper.from_array(bias.astype(np.float32), init.name))
        return proto

    return truncated


def test_failed_check_names_exit_and_writes_nothing(ckpt, deploy, monkeypatch):
    out = deploy
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(graph, "truncated", _break_exit2(graph.truncated))
    with pytest.raises(ByotError, match=r"exit 2 \(exit2\.onnx\): max abs error"):
        export_checkpoint(ckpt, out, exits=[1, 2, 3], segments=True, **TS)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # no new file, no temp file, nothing replaced


def test_real_inputs_from_data_dir(ckpt, tmp_path):
    notes: list[str] = []
    _, reports = export_checkpoint(ckpt, tmp_path / "d", exits=[4], data_dir=tmp_path,
                                   dataset="synthetic", progress=notes.append, **TS)
    assert any("synthetic test split" in n for n in notes)
    assert reports[0].passed and reports[0].samples == 16


def test_trt_without_tensorrt_gives_install_hint(ckpt, tmp_path, monkeypatch):
    import sys

    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(ByotError, match="pip install"):
        export_checkpoint(ckpt, tmp_path / "d", formats=("trt",), **TS)
    assert not (tmp_path / "d").exists()


def _app():
    from byot_edge.cli import app

    return app


def test_cli_prints_check_table(ckpt, tmp_path):
    out = tmp_path / "deploy"
    result = CliRunner().invoke(_app(), ["export", str(ckpt), "--exit", "2", "--out", str(out),
                                         "--segments", "--exporter", "torchscript"])
    assert result.exit_code == 0, result.output
    for name in ("exit2.onnx", "segment1.onnx", "segment4.onnx"):
        assert name in result.output
    assert "FAILED" not in result.output
    assert load_manifest(out).file_path(2, TRUNCATED_ONNX).is_file()


def test_cli_bad_exit(ckpt, tmp_path):
    result = CliRunner().invoke(_app(), ["export", str(ckpt), "--exit", "0", "--out",
                                         str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "1..4" in result.output


def test_export_records_what_each_segment_costs(exported_1_2):
    # Calibration prices cascades by these, on a device without torch: exit k alone is
    # sections 1..k plus branch k, FLOP for FLOP.
    m = load_manifest(exported_1_2)
    for k, e in enumerate(m.exits, 1):
        sections = sum(x.section_flops for x in m.exits[:k])
        assert e.branch_flops > 0 and sections + e.branch_flops == e.flops, k
