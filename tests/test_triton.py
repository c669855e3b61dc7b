"""`byot-edge triton-repo` and a real tritonserver (from PyPI's nvidia-pytriton wheel).

One server for the module, on two repositories written from the same deploy folder: the
BLS cascade over Python-backend segment models (`byot`), and the in-process variant
(`byot_inprocess`). Their answers must equal AnytimeModel's, row by row, over HTTP and gRPC.
The deploy folder's calibrated thresholds switch exit 2 off, so the calibrated plan runs
the span 2-3 model.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from server_fixtures import deployed_model
from typer.testing import CliRunner

from byot_edge.cli import app
from byot_edge.errors import ByotError
from byot_edge.manifest import SEGMENT_TRT, FileEntry, Thresholds, load_manifest
from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
from byot_edge.runtime.latency import resolve, select_profile
from byot_edge.runtime.preprocess import load_images
from byot_edge.triton.cascade import load_cascade
from byot_edge.triton.local import pytriton_server_dir, start_local_triton, stub_site
from byot_edge.triton.protocol import Request, parse_parameters
from byot_edge.triton.repository import (
    RepoOptions,
    read_record,
    verify_repository,
    write_repository,
)

OFF = 2.0


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> Path:
    """A copy of the session's deploy folder whose thresholds switch exit 2 off."""
    shared = deployed_model(tmp_path_factory)
    folder = tmp_path_factory.mktemp("triton") / "deploy"
    shutil.copytree(shared.manifest.parent, folder)
    manifest = load_manifest(folder)
    t = shared.thresholds
    manifest.thresholds = Thresholds("max_softmax", [t[0], OFF, t[2]], source="test images")
    manifest.save()
    return folder / "manifest.json"


@pytest.fixture(scope="module")
def images(tmp_path_factory, deploy) -> np.ndarray:
    shared = deployed_model(tmp_path_factory)
    return load_images(shared.images, load_manifest(deploy).input)


@pytest.fixture(scope="module")
def reference(deploy):
    with AnytimeModel.load(deploy, threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def repos(deploy, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repos")
    bls = write_repository(deploy, root / "bls", RepoOptions(
        threads=1, max_queue_delay_us=2000, max_batch=16))
    assert set(bls["models"]) == {"segment1", "segment2", "segment3", "segment4", "span2-3"}
    write_repository(deploy, root / "inprocess", RepoOptions(
        name="byot_inprocess", mode="inprocess", threads=1, max_batch=16))
    return {"bls": root / "bls", "inprocess": root / "inprocess"}


@pytest.fixture(scope="module")
def triton(repos, tmp_path_factory):
    pytest.importorskip("tritonclient.http", reason="tritonclient is not installed "
                        "(pip install 'byot-edge[triton]')")
    if pytriton_server_dir() is None:
        pytest.skip("nvidia-pytriton (which ships tritonserver) is not installed; "
                    "scripts/test.sh installs it where pip can")
    try:
        stub_site()
    except ByotError as e:
        pytest.skip(str(e))
    t0 = time.perf_counter()
    server = start_local_triton(repos["bls"], tmp_path_factory.mktemp("tritonserver"),
                                extra_args=("--model-repository", str(repos["inprocess"])))
    print(f"tritonserver ready in {time.perf_counter() - t0:.1f} s")
    yield server
    for _, c in _CLIENTS.values():
        c.close()  # an open connection would hold the server's shutdown
    _CLIENTS.clear()
    server.stop()


_CLIENTS: dict[str, tuple] = {}


def _client(triton, protocol: str):
    if protocol not in _CLIENTS:
        if protocol == "http":
            import tritonclient.http as client

            _CLIENTS[protocol] = client, client.InferenceServerClient(triton.http_url,
                                                                      concurrency=16)
        else:
            import tritonclient.grpc as client

            _CLIENTS[protocol] = client, client.InferenceServerClient(triton.grpc_url)
    return _CLIENTS[protocol]


def infer(triton, protocol: str, model: str, x: np.ndarray, params: dict,
          datatype: str = "FP32"):
    client, c = _client(triton, protocol)
    inp = client.InferInput("image", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return c.infer(model, [inp], parameters=params)


def _budget_between_exits(reference: AnytimeModel, n: int) -> float:
    """A budget halfway between two of the profiled exit latencies at batch n, so that
    timing noise cannot put it on one of them."""
    choice = select_profile(reference.manifest, "onnxruntime", reference.backend.device, n)
    assert choice is not None
    latency = sorted(resolve(choice).exits)
    return (latency[1] + latency[2]) / 2


MODES = {
    "threshold": lambda ref, n: {"threshold": 0.35},
    "per-exit thresholds": lambda ref, n: {"threshold": "0.4,0.38,0.3"},
    "budget": lambda ref, n: {"budget_ms": _budget_between_exits(ref, n)},
    "threshold and a generous deadline": lambda ref, n: {"threshold": 0.35, "budget_ms": 1e6},
    "fixed exit": lambda ref, n: {"exit": 2, "top_k": 3},
    "calibrated": lambda ref, n: {},
}


def _options(params: dict) -> PredictOptions:
    t = params.get("threshold")
    if isinstance(t, str):
        t = [float(v) for v in t.split(",")]
    return PredictOptions(threshold=t, budget_ms=params.get("budget_ms"),
                          exit=params.get("exit"))


def assert_same_answers(got, want, params, where: str) -> None:
    """A protocol response (tritonclient's InferResult) answers as the runtime did."""
    assert got.as_numpy("exit").ravel().tolist() == want.exits, where
    assert got.as_numpy("class_index").ravel().tolist() == want.indices, where
    np.testing.assert_allclose(got.as_numpy("confidence").ravel(), want.confidences,
                               rtol=1e-4, err_msg=where)
    if "top_k" in params:
        top = np.argsort(-want.probabilities, axis=-1, kind="stable")[:, :3]
        assert got.as_numpy("top_k_class").tolist() == top.tolist(), where
    else:
        assert got.as_numpy("top_k_class") is None, where


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["byot", "byot_inprocess"])
def test_answers_equal_the_anytime_model(triton, reference, images, protocol, model):
    seen_exits: set[int] = set()
    for mode, make in MODES.items():
        for n in (1, 8):
            x = images[:n] if n == 8 else images[5:6]
            params = make(reference, n)
            want = reference.run(x, _options(params))
            got = infer(triton, protocol, model, x, params)
            assert_same_answers(got, want, params, f"{model} over {protocol}, {mode}, batch {n}")
            seen_exits.update(want.exits)
    assert len(seen_exits) >= 3  # the images take different exits: the cascade is exercised


BAD = [
    ("wrong shape", np.zeros((1, 3, 16, 16), np.float32), "FP32", {}, "shape"),
    ("wrong dtype", np.zeros((1, 3, 32, 32), np.float64), "FP64", {}, "FP64"),
    ("NaN", np.full((2, 3, 32, 32), np.nan, np.float32), "FP32", {}, "NaN"),
    ("threshold above 1", None, "FP32", {"threshold": 1.5}, "threshold"),
    ("threshold list too short", None, "FP32", {"threshold": "0.5,0.5"}, "threshold"),
    ("exit 9", None, "FP32", {"exit": 9}, "exit 9"),
    ("negative budget", None, "FP32", {"budget_ms": -1.0}, "budget_ms"),
    ("top_k too large", None, "FP32", {"top_k": 11}, "top_k"),
    ("exit with threshold", None, "FP32", {"exit": 1, "threshold": 0.5}, "either"),
    ("unknown parameter", None, "FP32", {"temperature": 3}, "unknown parameter"),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_400_and_the_server_stays_up(triton, images, protocol):
    from tritonclient.utils import InferenceServerException

    for what, x, datatype, params, words in BAD:
        x = images[:1] if x is None else x
        with pytest.raises(InferenceServerException) as e:
            infer(triton, protocol, "byot", x, params, datatype)
        status = e.value.status()
        assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (what, status, e.value)
        assert words.lower() in e.value.message().lower(), (what, e.value.message())
    _, c = _client(triton, protocol)
    assert c.is_server_live() and c.is_model_ready("byot")
    assert infer(triton, protocol, "byot", images[:2], {}).as_numpy("exit").shape == (2, 1)


def _batch_sizes(triton, model: str) -> set[int]:
    _, c = _client(triton, "http")
    (stats,) = c.get_inference_statistics(model)["model_stats"]
    return {int(b["batch_size"]) for b in stats["batch_stats"]}


def test_segments_batch_concurrent_requests(triton, images):
    """Sixteen clients at once, one image each, every shallow exit off: every request runs
    all four segments, and the segment models see batches of several requests."""
    def one(i: int) -> int:
        # gRPC: tritonclient's HTTP client must not be shared between threads
        r = infer(triton, "grpc", "byot", images[i % 16: i % 16 + 1], {"threshold": OFF})
        return int(r.as_numpy("exit")[0, 0])

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(64))) == {4}
    for k in (1, 4):
        sizes = _batch_sizes(triton, f"byot_segment{k}")
        assert max(sizes) > 1, f"segment {k} only ever ran batches of {sorted(sizes)}"


def test_the_cascade_refuses_a_changed_repository(repos, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repos["bls"], copy)
    root, record = read_record(copy / "byot")
    verify_repository(root, record)  # as written: fine
    seg = copy / "byot_segment2" / "1" / "model.onnx"
    seg.write_bytes(seg.read_bytes()[:-1] + b"\0")
    with pytest.raises(ByotError, match=r"byot_segment2/1/model\.onnx does not match"):
        verify_repository(root, record)
    with pytest.raises(ByotError, match="does not match"):  # what Triton's load calls
        load_cascade(str(copy / "byot"), pb_utils=None)
    seg.unlink()
    with pytest.raises(ByotError, match="missing"):
        verify_repository(root, record)


def _parse_config(path: Path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    # Parse is strict: a field model_config.proto does not have fails the test.
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _with_fake_engines(deploy: Path, folder: Path) -> Path:
    """The deploy folder with made-up segment engines (bytes only: nothing loads them)."""
    shutil.copytree(deploy.parent, folder)
    manifest = load_manifest(folder)
    for e in manifest.exits:
        onnx = e.files["segment_onnx"]
        path = folder / f"segment{e.index}.plan"
        path.write_bytes(b"not an engine %d" % e.index)
        from byot_edge.fileio import sha256_file

        e.files[SEGMENT_TRT] = FileEntry(path.name, sha256_file(path), onnx.inputs, onnx.outputs)
    manifest.save()
    return folder / "manifest.json"


@pytest.mark.parametrize("segments", ["onnxruntime", "tensorrt"])
def test_platform_configs_follow_the_model_configuration(deploy, tmp_path, segments):
    manifest = deploy if segments == "onnxruntime" else _with_fake_engines(deploy,
                                                                           tmp_path / "d")
    record = write_repository(manifest, tmp_path / "repo", RepoOptions(
        segments=segments, max_batch=8, instances=3, max_queue_delay_us=500))
    spans = {"span2-3"} if segments == "onnxruntime" else set()  # engines are not joined
    assert set(record["models"]) == {f"segment{k}" for k in range(1, 5)} | spans
    m = load_manifest(deploy)
    FP32 = pytest.importorskip("tritonclient.grpc.model_config_pb2").TYPE_FP32
    for artifact, entry in record["models"].items():
        config = _parse_config(tmp_path / "repo" / entry["model"] / "config.pbtxt")
        assert config.name == entry["model"]
        assert config.platform == {"onnxruntime": "onnxruntime_onnx",
                                   "tensorrt": "tensorrt_plan"}[segments]
        assert config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        (group,) = config.instance_group
        assert group.count == 3
        assert group.kind == (group.KIND_GPU if segments == "tensorrt" else group.KIND_CPU)
        first = int(artifact.removeprefix("segment").removeprefix("span").split("-")[0])
        spec = m.exit(first).files["segment_onnx"].inputs[0]
        (inp,) = config.input
        assert inp.name == spec.name and list(inp.dims) == spec.shape[1:]
        assert inp.data_type == FP32
        assert {o.name for o in config.output} >= {"logits"}
        suffix = "plan" if segments == "tensorrt" else "onnx"
        assert entry["file"] == f"{entry['model']}/1/model.{suffix}"
    cascade = _parse_config(tmp_path / "repo" / "byot" / "config.pbtxt")
    assert cascade.backend == "python" and list(cascade.input[0].dims) == m.input.shape
    assert [o.name for o in cascade.output] == ["class_index", "confidence", "exit",
                                                "top_k_class", "top_k_probability"]


def test_the_command_writes_a_repository_and_refuses_bad_options(deploy, tmp_path):
    runner = CliRunner()
    out = tmp_path / "repo"
    result = runner.invoke(app, ["triton-repo", str(deploy), "--out", str(out), "--name", "clf",
                                 "--mode", "inprocess"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "clf" / "1" / "repository.json").read_text())
    assert record["mode"] == "inprocess" and record["models"] == {}
    assert "clf/1/deploy/segment1.onnx" in record["files"] or any(
        f.startswith("clf/1/deploy/") and f.endswith(".onnx") for f in record["files"])
    for args, words in ((["--out", str(out)], "not empty"),
                        (["--out", str(tmp_path / "x"), "--segments", "tflite"], "--segments"),
                        (["--out", str(tmp_path / "y"), "--name", "a b"], "--name"),
                        (["--out", str(tmp_path / "z"), "--max-batch", "0"], "--max-batch")):
        result = runner.invoke(app, ["triton-repo", str(deploy), *args])
        assert result.exit_code == 2 and words in result.output, (args, result.output)


def test_engines_are_asked_for_where_the_manifest_has_none(deploy, tmp_path):
    with pytest.raises(ByotError, match="--segments --format trt"):
        write_repository(deploy, tmp_path / "repo", RepoOptions(segments="tensorrt"))


def test_parameters_are_parsed_strictly():
    parsed = parse_parameters({"threshold": "0.5, 0.4,0.3", "top_k": 2.0}, 4, 10)
    assert parsed.options.threshold == (0.5, 0.4, 0.3) and parsed.top_k == 2
    assert parsed.batchable and not parse_parameters({"budget_ms": 3}, 4, 10).batchable
    assert parse_parameters({}, 4, 10) == Request(PredictOptions(), 0)
    for params, words in (({"threshold": True}, "number"), ({"threshold": "nan"}, "finite"),
                          ({"exit": 1.5}, "whole"), ({"top_k": -1}, "top_k"),
                          ({"budget_ms": "fast"}, "number"), ({"exit": 0}, "exit 0")):
        with pytest.raises(ByotError, match=words):
            parse_parameters(params, 4, 10)


class FakePb:
    """The few pieces of triton_python_backend_utils the cascade model uses."""

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message: str, code: str) -> None:
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name: str, a: np.ndarray) -> None:
            self.name, self.a = name, a

        def as_numpy(self) -> np.ndarray:
            return self.a

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None) -> None:
            self.outputs = {t.name: t.a for t in output_tensors or []}
            self.error = error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.inputs.get(name)


class FakeRequest:
    def __init__(self, x: np.ndarray | None, parameters: str) -> None:
        self.inputs = {} if x is None else {"image": FakePb.Tensor("image", x)}
        self._parameters = parameters

    def parameters(self) -> str:
        return self._parameters


def test_a_bad_request_in_a_dynamic_batch_fails_alone(reference, images):
    from byot_edge.triton.cascade import CascadeModel

    cascade = CascadeModel(reference, FakePb)
    requests = [FakeRequest(images[:2], "{}"),
                FakeRequest(None, "{}"),  # no input
                FakeRequest(images[:1], "[1]"),
                FakeRequest(images[:1], '"x"'),
                FakeRequest(images[:1], "{not json"),
                FakeRequest(images[:1], '{"threshold": "high"}'),
                FakeRequest(images[2:3], '{"top_k": 2}')]
    answers = cascade.execute(requests)
    assert len(answers) == len(requests)
    want = {1: "no input 'image'", 2: "map of name to value", 3: "map of name to value",
            4: "not JSON", 5: "number"}
    for i, words in want.items():
        error = answers[i].error
        assert error is not None and error.code == "INVALID_ARG", (i, error)
        assert words in error.message, (i, error.message)
    assert answers[0].error is None and answers[0].outputs["exit"].shape == (2, 1)
    assert answers[0].outputs["exit"][:, 0].tolist() == reference.run(images[:2]).exits
    assert answers[6].error is None and answers[6].outputs["top_k_class"].shape == (1, 2)


def test_the_triton_cascade_runs_learned_gates_as_the_runtime_does(deploy, tmp_path, images):
    """A gated manifest through triton-repo's in-process cascade: the same exits as
    AnytimeModel's (the gates' weights travel in the manifest the repository carries)."""
    from byot_edge.runtime.gates import FEATURES, GATE, Gate
    from byot_edge.triton.cascade import CascadeModel

    folder = Path(shutil.copytree(deploy.parent, tmp_path / "deploy"))
    manifest = load_manifest(folder)
    k = manifest.num_exits
    rng = np.random.default_rng(5)
    gates = [Gate(tuple(rng.normal(0, 2, len(FEATURES)).tolist()), 0.0) for _ in range(k - 1)]
    manifest.thresholds = Thresholds(GATE, [0.5, OFF, 0.4][:k - 1], source="test",
                                     gates=[g.as_dict() for g in gates])
    manifest.save()
    write_repository(folder / "manifest.json", tmp_path / "repo", RepoOptions(
        name="gated", mode="inprocess", threads=1, max_batch=16))
    cascade = CascadeModel.from_args({"model_repository": str(tmp_path / "repo" / "gated")},
                                     FakePb)
    with AnytimeModel.load(folder / "manifest.json", threads=1) as reference:
        want = reference.run(images)
        answers = cascade.execute([FakeRequest(images[i:i + 1], "{}")
                                   for i in range(len(images))])
    assert [a.error for a in answers] == [None] * len(images)
    assert [int(a.outputs["exit"][0, 0]) for a in answers] == want.exits
    assert len(set(want.exits)) > 1
