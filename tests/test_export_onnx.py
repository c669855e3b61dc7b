"""ONNX export of every registry architecture: files, numerics, metadata, manifest.

Each architecture is exported once (module-scoped) with the TorchScript exporter, which takes
about a second where the torch.export-based one takes ten on a small CPU; the torch.export
path is covered on the paper's ResNet-18 below. The checks here re-run every file with ONNX
Runtime independently of the exporter's own checks, against the full network's forward.
"""

from __future__ import annotations

import collections
import json
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_checkpoint

from byot_edge.checkpoint import load_model
from byot_edge.export.exporter import export_checkpoint
from byot_edge.export.metadata import read_metadata
from byot_edge.fileio import sha256_file
from byot_edge.manifest import (
    SEGMENT_ONNX,
    TRUNCATED_ONNX,
    load_manifest,
)
from byot_edge.models import list_models
from byot_edge.runtime.backends.onnx_join import join_segments

RTOL = 1e-4
# What a lone ONNX file says about itself (for Netron and onnx users; the runtime reads the
# manifest): every written file must match the schema the package documents it with.
METADATA_SCHEMA = json.loads(
    resources.files("byot_edge.export").joinpath("onnx_metadata.schema.json").read_text())

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _export(root: Path, arch: str, exporter: str, **kw):
    ckpt = make_checkpoint(root / "ckpt.pt", arch)
    out = root / "deploy"
    manifest, reports = export_checkpoint(ckpt, out, segments=True, exporter=exporter, **kw)
    return ckpt, out, manifest, reports


@pytest.fixture(scope="module", params=list_models())
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return _export(root, request.param, "torchscript")


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _assert_files_match_pytorch(ckpt: Path, out: Path) -> None:
    """Each file, and the segments chained, on a batch of 1 (the export checked 16: the
    batch axis is dynamic) against the full network's forward."""
    model, _ = load_model(ckpt)
    manifest = load_manifest(out)
    k_max = model.num_exits
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = [z.numpy() for z in model(x).logits]
    h = x.numpy()
    for k in range(1, k_max + 1):
        (got,) = _run(manifest.file_path(k, TRUNCATED_ONNX), x.numpy())
        assert _rel_err(got, ref[k - 1]) <= RTOL, f"exit{k}.onnx"
        outs = _run(manifest.file_path(k, SEGMENT_ONNX), h)
        assert len(outs) == (1 if k == k_max else 2)
        assert _rel_err(outs[-1], ref[k - 1]) <= RTOL, f"chained segment{k}.onnx"
        h = outs[0]


def test_every_file_reproduces_pytorch(exported):
    ckpt, out, manifest, reports = exported
    k_max = manifest.num_exits
    assert sorted((r.kind, r.exit) for r in reports) == sorted(
        [("exit", k) for k in range(1, k_max + 1)] + [("segment", k) for k in range(1, k_max + 1)])
    assert all(r.passed and r.max_rel is not None and r.max_rel <= RTOL for r in reports)
    _assert_files_match_pytorch(ckpt, out)


def test_joined_segments_equal_the_chain_without_the_branches_inside(exported):
    manifest = exported[2]
    k_max = manifest.num_exits
    segs = [onnx.load(manifest.file_path(k, SEGMENT_ONNX)) for k in range(1, k_max + 1)]
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    chain, h = [], x  # (input, outputs) of each segment
    for k in range(1, k_max + 1):
        outs = _run(manifest.file_path(k, SEGMENT_ONNX), h)
        chain.append((h, outs))
        h = outs[0]
    for first in range(1, k_max + 1):
        for last in range(first + 1, k_max + 1):
            joined = join_segments(segs[first - 1:last])
            ops = collections.Counter(n.op_type for n in joined.graph.node)
            assert ops["Gemm"] + ops["MatMul"] == 1, f"span {first}..{last} holds {ops}"
            session = ort.InferenceSession(joined.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
            got = session.run(None, {session.get_inputs()[0].name: chain[first - 1][0]})
            # Exactly the chain's outputs: the same nodes, run in the same order.
            for g, want in zip(got, chain[last - 1][1], strict=True):
                np.testing.assert_array_equal(g, want)


def _assert_upsample_is_static(graph: onnx.GraphProto) -> None:
    """The attention's Resize takes a constant scale, not a size computed from a Shape: ONNX
    Runtime can then run it in its blocked conv layout (exit 1's branch: 0.23 -> 0.13 ms)."""
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        if node.op_type == "Resize":
            assert all(i in constants for i in node.input[1:] if i), list(node.input)
    assert not any(n.op_type == "Shape" for n in graph.node)


def test_truncated_file_holds_only_its_path(exported):
    _, out, manifest, _ = exported
    k_max = manifest.num_exits
    for k in range(1, k_max + 1):
        ops = collections.Counter(n.op_type for n in onnx.load(out / f"exit{k}.onnx").graph.node)
        assert ops["Gemm"] + ops["MatMul"] == 1, f"exit{k}.onnx holds {ops} classifiers"
        # Only shallow exits have a BYOT branch, and each has one attention upsample.
        assert ops["Resize"] == (1 if k < k_max else 0), f"exit{k}.onnx: {ops}"
        _assert_upsample_is_static(onnx.load(out / f"exit{k}.onnx").graph)
    sizes = [(out / f"exit{k}.onnx").stat().st_size for k in range(1, k_max + 1)]
    assert sizes[-1] < (out / "weights.pt").stat().st_size  # no file holds the whole network


def test_manifest_and_metadata(exported):
    ckpt, out, _, _ = exported
    model, state = load_model(ckpt)
    manifest = load_manifest(out)  # validates against the schema
    assert manifest.model == state["model_config"]
    assert manifest.class_names == state["data"]["class_names"]
    assert manifest.input.shape == [3, 32, 32]
    assert manifest.input.mean == state["data"]["mean"]
    assert manifest.input.std == state["data"]["std"]
    assert manifest.weights is not None
    assert sha256_file(out / manifest.weights.path) == manifest.weights.sha256
    k_max = model.num_exits
    for entry, info in zip(manifest.exits, model.exits, strict=True):
        k = entry.index
        assert (entry.flops, entry.params) == (info.flops, info.params)
        assert entry.val_accuracy == state["metrics"]["val_accuracy"][k - 1]
        exit_file, seg_file = entry.files[TRUNCATED_ONNX], entry.files[SEGMENT_ONNX]
        for f in (exit_file, seg_file):
            assert sha256_file(out / f.path) == f.sha256
        assert [(t.name, t.shape) for t in exit_file.inputs] == [("image", ["batch", 3, 32, 32])]
        assert [(t.name, t.shape) for t in exit_file.outputs] == [("logits", ["batch", 10])]
        assert [t.name for t in seg_file.inputs] == ["image" if k == 1 else f"section{k - 1}"]
        assert [t.name for t in seg_file.outputs] == ([f"section{k}"] if k < k_max else []) + [
            "logits"]
        for f, kind in ((exit_file, "exit"), (seg_file, "segment")):
            meta = read_metadata(onnx.load(out / f.path, load_external_data=False))
            jsonschema.validate(meta, METADATA_SCHEMA)
            assert meta["byot_edge.exit"] == k and meta["byot_edge.num_exits"] == k_max
            assert meta["byot_edge.kind"] == kind
            assert meta["byot_edge.class_names"] == manifest.class_names
            assert meta["byot_edge.mean"] == manifest.input.mean


def test_weights_file_rebuilds_the_network(exported):
    from byot_edge.models import model_from_config

    ckpt, out, _, _ = exported
    payload = torch.load(out / "weights.pt", weights_only=True)
    net = model_from_config(payload["model_config"])
    net.load_state_dict(payload["model"])
    model, _ = load_model(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(x).logits[-1], model(x).logits[-1])


def test_dynamo_exporter_resnet18(tmp_path):
    from byot_edge.errors import ByotError
    from byot_edge.export.graph import dynamo_unsupported

    if (why := dynamo_unsupported()) is not None:  # torch 2.4/2.5, the declared floor's
        with pytest.raises(ByotError, match="dynamo exporter needs a newer torch"):
            _export(tmp_path, "resnet18", "dynamo")
        pytest.skip(why)
    ckpt, out, _, reports = _export(tmp_path, "resnet18", "dynamo")
    assert all(r.passed for r in reports) and len(reports) == 8
    _assert_files_match_pytorch(ckpt, out)
    graph = onnx.load(out / "exit2.onnx").graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    _assert_upsample_is_static(graph)


def test_static_batch(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", "resnet18")
    manifest, reports = export_checkpoint(ckpt, tmp_path / "d", exits=[2], batch=3,
                                          exporter="torchscript")
    assert [(r.file, r.samples) for r in reports] == [("exit2.onnx", 3)]
    entry = manifest.exit(2).files[TRUNCATED_ONNX]
    assert entry.inputs[0].shape == [3, 3, 32, 32] and entry.outputs[0].shape == [3, 10]
    assert manifest.weights is not None and manifest.weights.inputs[0].shape == [3, 3, 32, 32]
    assert set(manifest.exit(1).files) == set()  # only exit 2 was asked for
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        _run(tmp_path / "d" / "exit2.onnx", np.zeros((2, 3, 32, 32), np.float32))
