"""The HTTP server, for real: `byot-edge serve` in a subprocess on a loopback port, spoken
to over HTTP. In-process batching and fuzzing tests are in test_server_app.py and
test_server_fuzz.py."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from server_fixtures import (
    HOST,
    REPO,
    Deployed,
    Server,
    client,
    deployed_model,
    running,
    start_server,
    wait_until,
)

from byot_edge import loadgen
from byot_edge.runtime.anytime import AnytimeModel, CascadeResult, PredictOptions
from byot_edge.runtime.preprocess import load_images
from byot_edge.runtime.server import PredictResponse

TOKEN = "s3cret-token-ü"  # non-ASCII on purpose: compared as bytes


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    return deployed_model(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(deployed: Deployed) -> Iterator[AnytimeModel]:
    with AnytimeModel.load(deployed.manifest, threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def server(deployed: Deployed) -> Iterator[Server]:
    with running(deployed.manifest, "--max-upload-mb", "1", "--max-batch", "32") as s:
        yield s


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with client(server.url) as c:
        yield c


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def post_npy(c: httpx.Client, x: np.ndarray, **params: Any) -> httpx.Response:
    return c.post("/v1/predict", content=npy(x), params=params,
                  headers={"Content-Type": "application/x-npy"})


def post_files(c: httpx.Client, paths: list[Path], **params: Any) -> httpx.Response:
    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return c.post("/v1/predict", files=files, params=params)


def assert_same(r: httpx.Response, expected: CascadeResult) -> PredictResponse:
    """The server's answer is the runtime's: class, exit, confidence, per sample."""
    assert r.status_code == 200, r.text
    body = PredictResponse.model_validate(r.json())
    assert [p.index for p in body.predictions] == expected.indices
    assert [p.exit for p in body.predictions] == expected.exits
    # float64 scores, written as JSON and read back: the same numbers
    assert [p.confidence for p in body.predictions] == expected.confidences
    assert body.mode == expected.mode
    for p in body.predictions:
        probs = [t.probability for t in p.top_k]
        assert p.top_k[0].index == p.index and probs == sorted(probs, reverse=True)
        assert p.top_k[0].probability == p.confidence
    return body


# -- predictions ----------------------------------------------------------------------------


def test_images_one_by_one_equal_the_runtime(http: httpx.Client, deployed: Deployed,
                                             reference: AnytimeModel) -> None:
    exits = []
    for path in deployed.images:
        expected = reference.run(load_images([path], reference.manifest.input))
        body = assert_same(post_files(http, [path]), expected)
        assert len(body.predictions[0].top_k) == 5  # the default top-k
        exits.append(body.predictions[0].exit)
    # The calibrated thresholds split the images: each answers from its own exit.
    assert len(set(exits)) >= 3, exits


def test_concurrent_images_are_batched_and_still_equal_the_runtime(
        server: Server, deployed: Deployed, reference: AnytimeModel) -> None:
    paths = deployed.images
    expected = reference.run(load_images(paths, reference.manifest.input))
    with client(server.url) as c, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: post_files(c, [p]), paths))
    for i, r in enumerate(responses):
        one = CascadeResult(expected.indices[i:i + 1], expected.confidences[i:i + 1],
                            expected.exits[i:i + 1], expected.latency_ms[i:i + 1],
                            expected.mode)
        assert_same(r, one)


def test_several_files_in_one_request_answer_in_order(http: httpx.Client, deployed: Deployed,
                                                      reference: AnytimeModel) -> None:
    paths = deployed.images[:6]
    expected = reference.run(load_images(paths, reference.manifest.input))
    body = assert_same(post_files(http, paths, top_k=3), expected)
    assert body.batch_size >= 6 and all(len(p.top_k) == 3 for p in body.predictions)


@pytest.mark.parametrize("params", [
    {"threshold": 0.35},
    {"threshold": [0.3, 0.6, 0.9]},
    {"exit": 2},
    {"exit": 4},
    {"budget_ms": 1e6},  # every exit fits: the deepest
    {"budget_ms": 1e-6},  # none fits: exit 1, with a warning
    {"threshold": 0.5, "budget_ms": 1e6},  # a deadline cascade
    {"threshold": 1},  # 1 is inside (0, 1]
], ids=str)
def test_options_equal_the_runtime(http: httpx.Client, deployed: Deployed,
                                   reference: AnytimeModel, params: dict[str, Any]) -> None:
    x = load_images(deployed.images, reference.manifest.input)
    t = params.get("threshold")
    options = PredictOptions(threshold=tuple(t) if isinstance(t, list) else t,
                             budget_ms=params.get("budget_ms"), exit=params.get("exit"))
    with warnings.catch_warnings():  # the runtime's own warning, also in the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = reference.run(x, options)
    body = assert_same(post_npy(http, x, **params), expected)
    if params.get("budget_ms") == 1e-6:
        assert any("no exit fits" in w for w in body.warnings)


def test_tensors_as_json_npy_and_images_agree(http: httpx.Client, deployed: Deployed,
                                              reference: AnytimeModel) -> None:
    paths = deployed.images[:4]
    x = load_images(paths, reference.manifest.input)
    expected = reference.run(x)
    assert_same(post_npy(http, x), expected)
    assert_same(http.post("/v1/predict", json={"tensor": x.tolist()}), expected)
    # One sample [C, H, W] is a batch of one.
    assert_same(http.post("/v1/predict", json={"tensor": x[0].tolist()}),
                reference.run(x[:1]))
    raw = http.post("/v1/predict", content=paths[0].read_bytes(),
                    headers={"Content-Type": "image/png" if paths[0].suffix == ".png"
                             else "image/jpeg"})
    assert_same(raw, reference.run(x[:1]))


# -- bad inputs -------------------------------------------------------------------------------


def png_bytes(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


GOOD = np.zeros((1, 3, 32, 32), np.float32)
NAN = GOOD.copy()
NAN[0, 1, 2, 3] = np.nan
INF = GOOD.copy()
INF[0, 0, 0, 0] = np.inf

# A header saying (-1, -2, -3, -1024): its product is the data's 6144 values, so it passed
# the size check, then reshape raised (a 500).
NEGATIVE_NPY = npy(np.zeros((2, 3, 32, 32), np.float32)).replace(
    b"(2, 3, 32, 32), }     ", b"(-1, -2, -3, -1024), }", 1)

# (id, request kwargs, status, a fragment of the message)
BAD: list[tuple[str, dict[str, Any], int, str]] = [
    ("text file", {"files": {"file": ("notes.txt", b"hello, world\n" * 20)}}, 422,
     "not an image"),
    ("truncated png", {"files": {"file": ("a.png", png_bytes((40, 40))[:60])}}, 422,
     "not an image"),
    ("raw garbage as image/png", {"content": b"\x89PNG garbage",
                                  "headers": {"Content-Type": "image/png"}}, 422,
     "not an image"),
    ("no file part", {"files": {"image": ("a.png", png_bytes((8, 8)))}}, 422,
     "unexpected form field"),
    ("options as form fields", {"files": {"file": ("a.png", png_bytes((8, 8)))},
                                "data": {"threshold": "0.5"}}, 422, "query string"),
    ("wrong tensor shape", {"content": npy(np.zeros((2, 3, 16, 16), np.float32)),
                            "headers": {"Content-Type": "application/x-npy"}}, 422,
     "got shape [2, 3, 16, 16]"),
    ("NHWC tensor", {"content": npy(np.zeros((1, 32, 32, 3), np.float32)),
                     "headers": {"Content-Type": "application/x-npy"}}, 422, "NHWC"),
    ("float64 tensor", {"content": npy(GOOD.astype(np.float64)),
                        "headers": {"Content-Type": "application/x-npy"}}, 422,
     "dtype float64"),
    ("uint8 tensor", {"content": npy(GOOD.astype(np.uint8)),
                      "headers": {"Content-Type": "application/x-npy"}}, 422, "normalise"),
    ("NaN in npy", {"content": npy(NAN), "headers": {"Content-Type": "application/x-npy"}},
     422, "NaN"),
    ("inf in npy", {"content": npy(INF), "headers": {"Content-Type": "application/x-npy"}},
     422, "NaN or inf"),
    ("NaN in JSON", {"content": b'{"tensor": [[[NaN]]]}',
                     "headers": {"Content-Type": "application/json"}}, 422, "shape"),
    ("object npy", {"content": npy(np.array([{"a": 1}], dtype=object)),
                    "headers": {"Content-Type": "application/x-npy"}}, 422, "objects"),
    ("truncated npy", {"content": npy(GOOD)[:-100],
                       "headers": {"Content-Type": "application/x-npy"}}, 400, "npy"),
    ("not npy", {"content": b"hello", "headers": {"Content-Type": "application/x-npy"}}, 400,
     "npy"),
    ("invalid JSON", {"content": b'{"tensor": [1, 2', "headers": {
        "Content-Type": "application/json"}}, 400, "not valid JSON"),
    ("JSON without tensor", {"json": {"image": [1, 2, 3]}}, 422, '"tensor"'),
    ("JSON strings", {"json": {"tensor": [["a"]]}}, 422, "numbers"),
    ("ragged JSON", {"json": {"tensor": [[1, 2], [3]]}}, 422, "regular shape"),
    ("unknown content type", {"content": b"abc", "headers": {"Content-Type": "text/plain"}},
     415, "unsupported content type"),
    ("too many samples", {"content": npy(np.zeros((33, 3, 32, 32), np.float32)),
                          "headers": {"Content-Type": "application/x-npy"}}, 413, "at most 32"),
    ("upload over the limit", {"files": {"file": ("big.png", b"\x89PNG" + b"0" * 2**20 * 2)}},
     413, "limit of 1 MiB"),
    ("chunked upload over the limit", {"content": [b"0" * 600_000] * 2,  # chunked: a list
                                       "headers": {"Content-Type": "image/png"}},
     413, "limit of 1 MiB"),
    # A .npy body's length follows from its samples: past max-batch's, refused unread.
    ("chunked npy longer than 32 samples", {"content": [b"0" * 300_000] * 2,
                                            "headers": {"Content-Type": "application/x-npy"}},
     413, "at most 32"),
    ("npy with negative dimensions", {"content": NEGATIVE_NPY,
                                      "headers": {"Content-Type": "application/x-npy"}},
     400, "negative dimension"),
    ("JSON with more values than 32 samples", {"json": {"tensor": np.zeros(
        (33, 3, 32, 32), np.uint8).tolist()}}, 413, ".npy"),
    ("image over the pixel limit", {"files": {"file": ("huge.png",
                                                       png_bytes((5000, 4000), "L"))}},
     413, "pixels"),
]
BAD_PARAMS: list[tuple[str, dict[str, Any], str]] = [
    ("threshold 0", {"threshold": 0}, "greater than 0"),
    ("threshold 1.5", {"threshold": 1.5}, "less than or equal to 1"),
    ("threshold -0.2", {"threshold": -0.2}, "greater than 0"),
    ("threshold nan", {"threshold": "nan"}, "threshold"),
    ("threshold inf", {"threshold": "inf"}, "threshold"),
    ("threshold text", {"threshold": "high"}, "valid number"),
    ("two thresholds for three exits", {"threshold": [0.5, 0.6]}, "expected one threshold"),
    ("exit 0", {"exit": 0}, "greater than or equal to 1"),
    ("exit 5", {"exit": 5}, "less than or equal to 4"),
    ("exit and threshold", {"exit": 2, "threshold": 0.5}, "either exit"),
    ("budget 0", {"budget_ms": 0}, "greater than 0"),
    ("top_k 11", {"top_k": 11}, "less than or equal to 10"),
    ("unknown criterion", {"criterion": "vibes"}, "criterion"),
    ("unknown parameter", {"treshold": 0.5}, "unknown query parameter"),
]


@pytest.mark.parametrize(("kwargs", "status", "fragment"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx(http: httpx.Client, kwargs: dict[str, Any], status: int,
                                    fragment: str) -> None:
    r = http.post("/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


@pytest.mark.parametrize(("params", "fragment"), [b[1:] for b in BAD_PARAMS],
                         ids=[b[0] for b in BAD_PARAMS])
def test_bad_options_get_422(http: httpx.Client, params: dict[str, Any], fragment: str) -> None:
    r = post_npy(http, GOOD, **params)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]


def test_after_every_bad_input_the_server_answers_and_never_gave_5xx(
        http: httpx.Client, deployed: Deployed, reference: AnytimeModel) -> None:
    for _, kwargs, _, _ in BAD:
        http.post("/v1/predict", **kwargs)
    x = load_images(deployed.images[:2], reference.manifest.input)
    assert_same(post_npy(http, x), reference.run(x))
    metrics = http.get("/metrics").text
    assert 'status="422"' in metrics
    assert not re.search(r'requests_total\{endpoint="/v1/predict",status="5', metrics)


# -- the other endpoints ------------------------------------------------------------------


def test_model_endpoint_describes_the_manifest(http: httpx.Client, deployed: Deployed,
                                               reference: AnytimeModel) -> None:
    info = http.get("/v1/model").json()
    m = reference.manifest
    assert info["num_exits"] == m.num_exits and info["class_names"] == m.class_names
    assert [e["flops"] for e in info["exits"]] == [e.flops for e in m.exits]
    assert [e["val_accuracy"] for e in info["exits"]] == [e.val_accuracy for e in m.exits]
    assert [e["threshold"] for e in info["exits"]] == [*deployed.thresholds, None]
    assert info["thresholds"]["values"] == deployed.thresholds
    assert {p["batch"] for p in info["latency_profiles"]} == {1, 8}
    assert info["input"]["shape"] == m.input.shape
    assert info["serving"]["backend"] == "onnxruntime" and info["serving"]["max_batch"] == 32
    assert info["serving"]["auth"] is False


def test_health_ready_and_metrics(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}

    def count(text: str, exit_: int) -> float:
        m = re.search(rf'^byot_edge_exits_total{{exit="{exit_}"}} (\S+)$', text, re.MULTILINE)
        assert m, text[:2000]
        return float(m.group(1))

    before = http.get("/metrics")
    assert before.headers["content-type"].startswith("text/plain")
    r = post_npy(http, np.zeros((3, 3, 32, 32), np.float32), exit=3)
    assert r.status_code == 200
    after = http.get("/metrics").text
    assert count(after, 3) == count(before.text, 3) + 3
    for name in ("byot_edge_http_request_duration_seconds_bucket", "byot_edge_batch_size_bucket",
                 "byot_edge_inference_duration_seconds_bucket", "byot_edge_queue_depth",
                 "byot_edge_queue_wait_duration_seconds_bucket", "byot_edge_requests_in_flight",
                 'byot_edge_http_requests_total{endpoint="/v1/predict",status="200"}',
                 "byot_edge_ready 1.0"):
        assert name in after, name


def test_openapi_schema_documents_the_api(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    op = schema["paths"]["/v1/predict"]["post"]
    params = {p["name"]: p for p in op["parameters"]}
    assert set(params) == {"threshold", "budget_ms", "exit", "top_k", "criterion", "stat",
                           "deadline_ms"}
    assert params["exit"]["schema"]["anyOf"][0]["maximum"] == 4
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "image/png",
                                                  "image/jpeg", "application/json",
                                                  "application/x-npy"}
    assert {"200", "400", "413", "415", "422", "503", "504"} <= set(op["responses"])
    assert {"/v1/model", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    assert "swagger" in http.get("/docs").text.lower()


# -- auth ---------------------------------------------------------------------------------


def test_bearer_token_from_the_environment(deployed: Deployed) -> None:
    with running(deployed.manifest, env={"BYOT_EDGE_TOKEN": TOKEN},
                 stop_signal=signal.SIGINT) as s:
        def auth(value: str) -> dict[str, Any]:
            # The raw UTF-8 bytes, as curl sends them (httpx sends str headers as ASCII).
            return {"Authorization": value.encode(), "Content-Type": "application/x-npy"}

        with client(s.url) as c:
            for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
                assert c.get(path).status_code == 200, path  # stay open
            wrong = [{"Content-Type": "application/x-npy"}, auth("Bearer wrong"),
                     auth("Basic " + TOKEN), auth("Bearer " + TOKEN[:-1]), auth("Bearer")]
            for headers in wrong:
                r = c.post("/v1/predict", content=npy(GOOD), headers=headers)
                assert r.status_code == 401, headers
                assert r.headers["www-authenticate"] == "Bearer"
                assert "bearer token" in r.json()["detail"]
            assert c.get("/v1/model").status_code == 401
            assert c.get("/metrics").status_code == 401
            good = auth("Bearer " + TOKEN)
            r = c.post("/v1/predict", content=npy(GOOD), headers=good)
            assert r.status_code == 200, r.text
            assert c.get("/v1/model", headers=good).json()["serving"]["auth"] is True
            assert c.get("/metrics", headers=good).status_code == 200
    # Ctrl-C: a clean stop.
    assert s.proc.returncode == 0, s.log
    assert "server stopped" in s.log


# -- overload and shutdown ------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(deployed: Deployed) -> Iterator[Server]:
    """Holds one prediction request at a time."""
    with running(deployed.manifest, "--max-queue", "1", "--max-batch", "4") as s:
        yield s


def background_post(url: str, body: Any) -> tuple[threading.Thread, list[Any]]:
    """POST an .npy body (bytes, or an iterator of chunks) from a thread; the response (or
    the transport error) lands in the list."""
    out: list[Any] = []

    def go() -> None:
        try:
            with client(url) as c:
                out.append(c.post("/v1/predict", content=body,
                                  headers={"Content-Type": "application/x-npy"}))
        except httpx.HTTPError as e:
            out.append(e)

    t = threading.Thread(target=go)
    t.start()
    return t, out


def trickle(data: bytes, go_on: threading.Event) -> Iterator[bytes]:
    """A body sent in two parts, the second once `go_on` is set: the server holds the
    request, reading it, for as long as the test needs."""
    yield data[:100]
    go_on.wait(60)
    yield data[100:]


def test_a_request_still_sending_holds_no_slot(slow_server: Server) -> None:
    # The only slot stays free while a body trickles in: a slow client cannot turn the
    # others away (503 for a full queue: the burst below, and test_server_app).
    s = slow_server
    go_on = threading.Event()
    t, first = background_post(s.url, trickle(npy(np.zeros((2, 3, 32, 32), np.float32)),
                                              go_on))
    try:
        wait_until(lambda: s.metric("byot_edge_requests_receiving") == 1, 30,
                   "the first request to be sending", s)
        assert s.metric("byot_edge_requests_in_flight") == 0
        with client(s.url) as c:
            r = post_npy(c, GOOD)
        assert r.status_code == 200, r.text
    finally:
        go_on.set()
        t.join(60)
    assert first and first[0].status_code == 200, first
    assert len(first[0].json()["predictions"]) == 2


def test_a_burst_gets_200s_and_503s_only_then_recovers(slow_server: Server) -> None:
    # Enough clients and requests that some arrive while one is held even when the model
    # answers in a fraction of a millisecond (12 clients and 48 requests once saw only 200s
    # on an idle machine).
    payloads = loadgen.npy_payloads(np.zeros((4, 3, 32, 32), np.float32))
    res = loadgen.run_load(slow_server.url, 32, 400, 30, payloads)
    assert set(res.statuses) <= {200, 503} and res.statuses.get(503, 0) > 0, res.statuses
    assert res.ok > 0 and not res.malformed, res.malformed[:3]
    with client(slow_server.url) as c:
        assert post_npy(c, GOOD).status_code == 200


def test_sigterm_finishes_the_requests_in_flight(deployed: Deployed) -> None:
    # A queued request waits (up to --max-wait-ms) for one still being read to join its
    # batch; that one trickles in only after SIGTERM: both must be answered, then exit 0.
    s = start_server(["serve", str(deployed.manifest), "--host", HOST, "--port", "PORT",
                      "--threads", "1", "--max-wait-ms", "60000", "--max-batch", "8"])
    go_on = threading.Event()
    try:
        t2, reading = background_post(s.url, trickle(npy(GOOD), go_on))
        wait_until(lambda: s.metric("byot_edge_requests_receiving") == 1, 30,
                   "the trickling request", s)
        t1, queued = background_post(s.url, npy(GOOD))
        wait_until(lambda: s.metric("byot_edge_queue_depth") == 1, 30, "a queued request", s)
        s.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "Shutting down" in s.log, 30, "uvicorn to start shutting down", s)
        go_on.set()
        t1.join(60)
        t2.join(60)
        for out in (queued, reading):
            assert out and isinstance(out[0], httpx.Response), out
            assert out[0].status_code == 200, out[0].text
            assert out[0].json()["batch_size"] == 2
        assert s.proc.wait(30) == 0, s.log
        assert "server stopped" in s.log
    finally:
        go_on.set()
        s.stop(signal.SIGKILL)


# -- load -----------------------------------------------------------------------------------


def test_bounded_load_has_no_5xx_and_well_formed_answers(
        server: Server, deployed: Deployed, reference: AnytimeModel,
        capsys: pytest.CaptureFixture[str]) -> None:
    x = load_images(deployed.images, reference.manifest.input)
    payloads = loadgen.npy_payloads(x) + [loadgen.Payload(p.read_bytes(), "image/png", 1, True)
                                       for p in deployed.images if p.suffix == ".png"]
    res = loadgen.run_load(server.url, 8, 240, 20, payloads, {"top_k": 2})
    assert res.server_errors == 0 and not res.malformed, (res.statuses, res.malformed[:3])
    assert res.statuses == {200: res.requests} and res.requests > 0
    summary = res.summary()
    with capsys.disabled():
        print(f"\n[load] {summary['requests']} requests from 8 clients in "
              f"{summary['wall_s']:.2f} s: {summary['throughput_rps']:.0f} req/s, "
              f"p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms")
    assert summary["p99_ms"] >= summary["p50_ms"] > 0


# -- the docs' examples, as written -----------------------------------------------------------


DOCS = REPO / "docs" / "serving.md"


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOCS.read_text(), re.DOTALL)


def as_here(text: str, server: Server, deployed: Deployed) -> str:
    """The docs' address and manifest path, pointed at this test's server and model."""
    return (text.replace("http://127.0.0.1:8080", server.url)
            .replace("deploy/manifest.json", str(deployed.manifest)))


@pytest.fixture(scope="module")
def docs_server(deployed: Deployed) -> Iterator[Server]:
    """The server started with the docs' own command line (only the port replaced)."""
    cmd = next(line for block in code_blocks("bash") for line in block.splitlines()
               if line.startswith("byot-edge serve"))
    argv = shlex.split(cmd)[1:]
    argv = [str(deployed.manifest) if a == "deploy/manifest.json" else a for a in argv]
    argv[argv.index("--port") + 1] = "PORT"
    s = start_server(argv)
    yield s
    assert s.stop() == 0, s.log


@pytest.fixture
def docs_dir(tmp_path: Path, deployed: Deployed) -> Path:
    """Laid out as the quickstart's folder: the image the examples name (batch.npy is made
    by the docs' own command)."""
    (tmp_path / "images").mkdir()
    shutil.copy(next(p for p in deployed.images if p.suffix == ".png"),
                tmp_path / "images" / "test0_ankle-boot.png")
    return tmp_path


def test_docs_curl_examples_work_as_written(docs_server: Server, deployed: Deployed,
                                            docs_dir: Path) -> None:
    lines = [line for block in code_blocks("bash") for line in block.splitlines()
             if line.startswith(("curl", "python -c"))]
    assert len(lines) >= 4
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "NO_PROXY": "*",
           "BYOT_EDGE_TOKEN": TOKEN}
    token_server = None
    try:
        for line in lines:
            if line.startswith("python -c"):  # makes a file the next examples send
                out = subprocess.run(["bash", "-c", as_here(line, docs_server, deployed)],
                                     cwd=docs_dir, env=env, capture_output=True, text=True,
                                     timeout=60)
                assert out.returncode == 0, (line, out.stderr)
                continue
            target = docs_server
            if "BYOT_EDGE_TOKEN" in line:
                if token_server is None:
                    token_server = start_server(
                        ["serve", str(deployed.manifest), "--host", HOST, "--port", "PORT"],
                        {"BYOT_EDGE_TOKEN": TOKEN})
                target = token_server
            out = subprocess.run(["bash", "-c", as_here(line, target, deployed)],
                                 cwd=docs_dir, env=env, capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 0, (line, out.stderr)
            body = PredictResponse.model_validate(json.loads(out.stdout))
            assert body.predictions, line
    finally:
        if token_server is not None:
            token_server.stop()


def test_docs_python_examples_work_as_written(docs_server: Server, deployed: Deployed,
                                              docs_dir: Path) -> None:
    blocks = code_blocks("python")
    assert len(blocks) >= 2
    for code in blocks:
        out = subprocess.run([sys.executable, "-c", as_here(code, docs_server, deployed)],
                             cwd=docs_dir, capture_output=True, text=True, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "NO_PROXY": "*",
                                  "OMP_WAIT_POLICY": "PASSIVE"})
        assert out.returncode == 0, (code, out.stderr)
        if "/v1/predict" in code:
            assert re.search(r"class\d+ \(\d\.\d\d\) from exit \d", out.stdout), out.stdout


def test_docs_sample_answer_matches_the_schema() -> None:
    sample = next(b for b in code_blocks("json") if '"predictions"' in b)
    PredictResponse.model_validate(json.loads(sample))


def test_readme_serving_examples_are_the_tested_ones() -> None:
    """The README repeats docs/serving.md's curl and Python examples, which the tests above
    run as written; this keeps the two identical."""
    readme = (REPO / "README.md").read_text()
    docs = DOCS.read_text()
    section = readme[readme.index("## Serving over HTTP"):readme.index("## Serving at scale")]
    blocks = re.findall(r"```(?:bash|python)\n.*?```", section, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        assert block in docs


def test_several_workers_share_the_port_and_stop_on_sigterm(deployed: Deployed,
                                                            reference: AnytimeModel) -> None:
    s = start_server(["serve", str(deployed.manifest), "--host", HOST, "--port", "PORT",
                      "--threads", "1", "--workers", "2"])
    try:
        wait_until(lambda: s.log.count("model warm") == 2, 60, "both workers warm", s)
        assert s.log.count("Started server process") == 2
        with client(s.url) as c:
            for _ in range(8):
                assert_same(post_npy(c, GOOD, exit=2), reference.run(GOOD, PredictOptions(exit=2)))
        assert s.stop() == 0, s.log
        assert "server stopped" in s.log
    finally:
        s.stop(signal.SIGKILL)


def test_a_killed_server_takes_its_workers_with_it(deployed: Deployed) -> None:
    # A test that fails kills its server with SIGKILL, which uvicorn cannot pass on: the
    # whole session goes, or the workers would outlive it and keep the port.
    s = start_server(["serve", str(deployed.manifest), "--host", HOST, "--port", "PORT",
                      "--threads", "1", "--workers", "2"])
    wait_until(lambda: s.log.count("Started server process") == 2, 60, "both workers", s)
    pids = [int(p) for p in re.findall(r"Started server process \[(\d+)\]", s.log)]
    s.stop(signal.SIGKILL)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie is gone

    wait_until(lambda: all(gone(p) for p in pids), 30, "the workers to go")


def test_workers_must_be_at_least_one(deployed: Deployed) -> None:
    from typer.testing import CliRunner

    from byot_edge.cli import app as cli_app

    out = CliRunner().invoke(cli_app, ["serve", str(deployed.manifest), "--workers", "0"])
    assert out.exit_code != 0 and "--workers" in out.output
