"""The server app in-process (create_app under uvicorn in a thread, on a loopback port):
dynamic batching made deterministic with a model whose runs wait on a gate, top-k,
readiness, the CLI's front door. Tests of `byot-edge serve` itself are in test_server.py."""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import APIRouter, Request
from server_fixtures import Deployed, client, deployed_model, in_thread, wait_until
from typer.testing import CliRunner

from byot_edge.cli import app as cli_app
from byot_edge.errors import ByotError
from byot_edge.manifest import load_manifest
from byot_edge.runtime.anytime import AnytimeModel, CascadeResult, PredictOptions
from byot_edge.runtime.backends import artifact_name
from byot_edge.runtime.batching import Batcher, BatcherClosed
from byot_edge.runtime.policies import softmax
from byot_edge.runtime.preprocess import check_batch, load_images
from byot_edge.runtime.server import PredictResponse, ServeConfig, ServerContext, create_app
from byot_edge.runtime.server.budget import BodyHold


class GatedModel(AnytimeModel):
    """Runs (and warms up) only while `gate` is set; records every run's batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.runs: list[tuple[int, PredictOptions]] = []
        self.fail_next: Exception | None = None

    def run_checked(self, x: np.ndarray, options: PredictOptions) -> CascadeResult:
        self.entered.set()  # the batcher runs what the server checked, unchecked
        assert self.gate.wait(30)
        self.runs.append((len(x), options))
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        return super().run_checked(x, options)

    def warmup(self, batch_size: int = 1) -> None:
        assert self.gate.wait(30)
        if self.fail_next is not None:
            raise self.fail_next
        super().warmup(batch_size)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    return deployed_model(tmp_path_factory)


@pytest.fixture(scope="module")
def x(deployed: Deployed) -> np.ndarray:
    return load_images(deployed.images, load_manifest(deployed.manifest).input)


@pytest.fixture
def model(deployed: Deployed) -> Iterator[GatedModel]:
    with GatedModel.load(deployed.manifest, threads=1) as m:
        yield m  # type: ignore[misc]


@contextmanager
def serving(model: AnytimeModel, **config: Any) -> Iterator[httpx.Client]:
    """create_app(model) under uvicorn in a thread; a client for it once it is up."""
    settings = {"warmup": False, "max_wait_ms": 0, **config}
    with in_thread(create_app(model, ServeConfig(**settings))) as url, client(url) as c:
        try:
            if not settings["warmup"]:
                wait_until(lambda: c.get("/readyz").status_code == 200, 30, "/readyz")
            yield c
        finally:  # before the server stops: requests stuck in a gated model would hold it
            if isinstance(model, GatedModel):
                model.gate.set()


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


class Requests:
    """Requests sent from threads, concurrently."""

    def __init__(self, c: httpx.Client) -> None:
        self.c = c
        self.threads: list[threading.Thread] = []
        self.responses: dict[int, Any] = {}

    def post(self, key: int, x: np.ndarray, **params: Any) -> None:
        def go() -> None:
            self.responses[key] = self.c.post("/v1/predict", content=npy(x), params=params,
                                              headers={"Content-Type": "application/x-npy"})

        t = threading.Thread(target=go)
        t.start()
        self.threads.append(t)

    def join(self) -> dict[int, Any]:
        for t in self.threads:
            t.join(60)
        return self.responses


def gauge(c: httpx.Client, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", c.get("/metrics").text, re.MULTILINE)
    assert m, name
    return float(m.group(1))


def block_worker(model: GatedModel, reqs: Requests, x: np.ndarray) -> None:
    """Request 0 enters the model and waits there, so the next ones queue up."""
    model.gate.clear()
    reqs.post(0, x[:1])
    assert model.entered.wait(30)


def test_requests_that_arrive_together_run_as_one_batch_each_with_its_own_exit(
        model: GatedModel, x: np.ndarray, deployed: Deployed) -> None:
    reference = AnytimeModel.load(deployed.manifest, threads=1)
    with serving(model, max_batch=16) as c:
        reqs = Requests(c)
        block_worker(model, reqs, x)
        for i in range(1, 11):
            reqs.post(i, x[i:i + 1])
        wait_until(lambda: gauge(c, "byot_edge_queue_depth") == 10, 30, "10 queued requests")
        model.gate.set()
        responses = reqs.join()
    assert [n for n, _ in model.runs] == [1, 10]
    exits = set()
    for i in range(1, 11):
        body = PredictResponse.model_validate(responses[i].json())
        assert body.batch_size == 10
        expected = reference.run(x[i:i + 1])
        assert body.predictions[0].index == int(expected.indices[0])
        assert body.predictions[0].exit == int(expected.exits[0])
        exits.add(body.predictions[0].exit)
    assert len(exits) > 1  # one batch, several exits


def test_requests_with_different_options_run_as_separate_batches(
        model: GatedModel, x: np.ndarray) -> None:
    with serving(model, max_batch=16) as c:
        reqs = Requests(c)
        block_worker(model, reqs, x)
        asks = [{"threshold": 0.3}, {"exit": 2}, {}, {"threshold": 0.3}, {"exit": 2},
                {"threshold": 0.3}]
        for i, params in enumerate(asks, start=1):
            reqs.post(i, x[i:i + 2], **params)
        wait_until(lambda: gauge(c, "byot_edge_queue_depth") == len(asks), 30, "queued")
        model.gate.set()
        responses = reqs.join()
    sizes = {options: n for n, options in model.runs[1:]}
    assert sizes == {PredictOptions(threshold=0.3): 6, PredictOptions(exit=2): 4,
                     PredictOptions(): 2}
    modes = {i: responses[i].json()["mode"] for i in range(1, len(asks) + 1)}
    assert modes == {1: "cascade", 2: "exit", 3: "cascade", 4: "cascade", 5: "exit",
                     6: "cascade"}
    assert all(responses[i].json()["batch_size"] == 6 for i in (1, 4, 6))


def test_batches_never_exceed_max_batch_nor_split_a_request(model: GatedModel,
                                                            x: np.ndarray) -> None:
    with serving(model, max_batch=8) as c:
        reqs = Requests(c)
        block_worker(model, reqs, x)
        for i in range(1, 6):
            reqs.post(i, x[3 * i - 3:3 * i])  # 3 samples each
        wait_until(lambda: gauge(c, "byot_edge_queue_depth") == 5, 30, "5 queued requests")
        model.gate.set()
        responses = reqs.join()
    assert [n for n, _ in model.runs[1:]] == [6, 6, 3]
    assert all(len(responses[i].json()["predictions"]) == 3 for i in range(1, 6))


def test_a_full_queue_answers_503_and_recovers(model: GatedModel, x: np.ndarray) -> None:
    with serving(model, max_queue=2) as c:
        reqs = Requests(c)
        block_worker(model, reqs, x)
        reqs.post(1, x[1:2])
        wait_until(lambda: gauge(c, "byot_edge_queue_depth") == 1, 30, "a queued request")
        r = c.post("/v1/predict", content=npy(x[2:3]),
                   headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "limit is 2" in r.json()["detail"]
        model.gate.set()
        assert all(r.status_code == 200 for r in reqs.join().values())
        r = c.post("/v1/predict", content=npy(x[2:3]),
                   headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 200


def _partial_upload(c: httpx.Client, body: bytes, declared: int) -> Any:
    """A raw connection that sends the headers and `body`, of `declared` bytes, then stalls."""
    import socket

    host, port = c.base_url.host, c.base_url.port
    sock = socket.create_connection((host, port), timeout=15)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-npy"
                 b"\r\nContent-Length: " + str(declared).encode() + b"\r\n\r\n" + body)
    return sock


def test_a_stalled_upload_gets_408_and_holds_no_queue_slot(model: GatedModel,
                                                            x: np.ndarray) -> None:
    with serving(model, max_queue=1, body_timeout_s=1.5) as c:
        data = npy(x[:1])
        sock = _partial_upload(c, data[:100], len(data))
        try:
            # The only queue slot is free while that client is still sending.
            r = c.post("/v1/predict", content=data, headers={"Content-Type": "application/x-npy"})
            assert r.status_code == 200, r.text
            reply = ""
            while "}" not in reply:  # the headers, then the JSON body (socket timeout: 15 s)
                chunk = sock.recv(4096).decode("latin-1")
                if not chunk:
                    break
                reply += chunk
        finally:
            sock.close()
        assert reply.startswith("HTTP/1.1 408"), reply
        assert "did not arrive within 1.5 s" in reply


def test_a_client_that_leaves_mid_upload_is_not_counted_as_a_server_error(
        model: GatedModel, x: np.ndarray) -> None:
    with serving(model) as c:
        data = npy(x[:1])
        _partial_upload(c, data[:100], len(data)).close()

        def counted() -> bool:
            return 'endpoint="/v1/predict",status="499"' in c.get("/metrics").text

        wait_until(counted, 30, "the disconnect in /metrics")
        assert 'status="500"' not in c.get("/metrics").text
        r = c.post("/v1/predict", content=data, headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 200


def test_images_over_the_request_pixel_budget_get_413_before_decoding(
        model: GatedModel, deployed: Deployed) -> None:
    from PIL import Image

    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, "PNG")
        return buf.getvalue()

    files = [("file", (f"{i}.png", png(100, 100), "image/png")) for i in range(3)]
    with serving(model, max_image_pixels=20_000, max_request_pixels=25_000) as c:
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 413 and "30000 pixels together" in r.json()["detail"]
        assert c.post("/v1/predict", files=files[:2]).status_code == 200
        r = c.post("/v1/predict", files=[("file", ("a.png", png(150, 150), "image/png"))])
        assert r.status_code == 413 and "150x150" in r.json()["detail"]
        tiff = io.BytesIO()
        Image.new("RGB", (32, 32)).save(tiff, "TIFF")
        r = c.post("/v1/predict", content=tiff.getvalue(), headers={"Content-Type": "image/tiff"})
        assert r.status_code == 422 and "PNG or JPEG" in r.json()["detail"]


def test_the_worker_survives_a_failing_batch(model: GatedModel, x: np.ndarray) -> None:
    with serving(model) as c:
        def post() -> Any:
            return c.post("/v1/predict", content=npy(x[:2]),
                          headers={"Content-Type": "application/x-npy"})

        model.fail_next = RuntimeError("boom")
        r = post()
        assert r.status_code == 500 and "the model failed" in r.json()["detail"]
        model.fail_next = ByotError("the manifest cannot do that")
        r = post()
        assert r.status_code == 422 and r.json()["detail"] == "the manifest cannot do that"
        assert post().status_code == 200
        assert c.get("/readyz").status_code == 200


def test_a_dead_worker_turns_not_ready_instead_of_hanging(
        model: GatedModel, x: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: Batcher, options: PredictOptions, group: list) -> None:
        raise RuntimeError("a bug in the batching loop")

    monkeypatch.setattr(Batcher, "_run", broken)
    with serving(model) as c:
        r = c.post("/v1/predict", content=npy(x[:1]),
                   headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 503 and "worker stopped" in r.json()["detail"]
        assert c.get("/readyz").json() == {"status": "worker stopped"}
        assert c.get("/healthz").status_code == 200


def test_not_ready_while_warming_up_and_after_a_failed_warmup(model: GatedModel,
                                                              x: np.ndarray) -> None:
    model.gate.clear()
    with serving(model, warmup=True) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "warming up"}
        r = c.post("/v1/predict", content=npy(x[:1]),
                   headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        model.gate.set()
        wait_until(lambda: c.get("/readyz").status_code == 200, 30, "/readyz")
        assert gauge(c, "byot_edge_ready") == 1
    model.fail_next = ByotError("segment2.onnx does not match the manifest")
    with serving(model, warmup=True) as c:
        wait_until(lambda: "failed" in c.get("/readyz").json()["status"], 30, "the failure")
        assert "segment2.onnx" in c.get("/readyz").json()["status"]
        r = c.post("/v1/predict", content=npy(x[:1]),
                   headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 503 and "warmup failed" in r.json()["detail"]


def test_freeze_gc_freezes_what_is_alive_once_warm_and_only_then(model: GatedModel) -> None:
    """`serve` sets freeze_gc: the objects alive after warm-up leave the collector's reach
    (a full collection over them paused a loaded server for 35-52 ms)."""
    import gc

    assert gc.get_freeze_count() == 0
    try:
        with serving(model, freeze_gc=False):
            assert gc.get_freeze_count() == 0
        with serving(model, freeze_gc=True):
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_serve_freezes_the_collector(monkeypatch: pytest.MonkeyPatch,
                                     deployed: Deployed) -> None:
    seen: list[ServeConfig] = []
    monkeypatch.setattr("byot_edge.runtime.server.create_app",
                        lambda model, config: seen.append(config) or APIRouter())
    monkeypatch.setattr("byot_edge.cli.serve.run_uvicorn", lambda *a, **k: None)
    result = CliRunner().invoke(cli_app, ["serve", str(deployed.manifest), "--port", "0"])
    assert result.exit_code == 0, result.output
    assert seen and seen[0].freeze_gc


def test_top_k_is_the_answering_exits_distribution(deployed: Deployed, x: np.ndarray) -> None:
    model = AnytimeModel.load(deployed.manifest, threads=1)
    with serving(model) as c:
        r = c.post("/v1/predict", content=npy(x), params={"top_k": 10},
                   headers={"Content-Type": "application/x-npy"})
    body = PredictResponse.model_validate(r.json())
    backend = AnytimeModel.load(deployed.manifest, threads=1).backend
    exits = {p.exit for p in body.predictions}
    assert len(exits) > 1
    for k in exits:  # each exit's own truncated network, run directly
        io_k = backend.load(artifact_name("exit", k))
        logits = backend.run(artifact_name("exit", k), {io_k.input: x})[io_k.logits]
        for i, p in enumerate(body.predictions):
            if p.exit == k:
                probs = np.zeros(10)
                probs[[t.index for t in p.top_k]] = [t.probability for t in p.top_k]
                np.testing.assert_allclose(probs, softmax(logits[i]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"max_queue": 0}, {"max_wait_ms": -1},
                                 {"max_upload_mb": 0}, {"token": " "},
                                 {"max_connections": 0},
                                 {"max_upload_mb": 20, "max_bodies_mb": 10}])
def test_bad_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ByotError):
        ServeConfig(**bad)


def test_cli_help_and_a_missing_manifest() -> None:
    runner = CliRunner()
    r = runner.invoke(cli_app, ["serve", "--help"])
    assert r.exit_code == 0
    for option in ("--max-batch", "--max-wait-ms", "--max-queue", "--max-upload-mb",
                   "--max-bodies-mb", "--max-connections", "--token", "BYOT_EDGE_TOKEN",
                   "Examples"):
        assert option in r.output, option
    r = runner.invoke(cli_app, ["serve", "/nonexistent/manifest.json", "--port", "1"])
    assert r.exit_code == 2 and "no manifest" in r.output


def test_each_request_gets_only_its_own_rows() -> None:
    # Every per-sample field of a batch's result is cut to the request, the probabilities
    # (for top-k) as well.
    from byot_edge.runtime.anytime import CascadeResult

    n = 5
    result = CascadeResult(list(range(n)), np.linspace(0, 1, n).tolist(), [1] * n, [0.0] * n,
                           "cascade", probabilities=np.eye(n))
    part = result.rows(slice(1, 3))
    for name in ("indices", "confidences", "exits", "latency_ms", "probabilities"):
        assert len(getattr(part, name)) == 2, name
    assert part.probabilities is not None and part.probabilities[0, 1] == 1


def test_the_model_endpoint_reports_the_device_the_sessions_really_run_on(
        deployed: Deployed) -> None:
    # ONNX Runtime falls back to the CPU silently when CUDA fails: the device is known only
    # once sessions exist, after the server was built (the warm-up creates them).
    from byot_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    class FallsBack(OnnxRuntimeBackend):
        @property
        def device(self) -> str:
            return "cpu (after the fallback)" if self._sessions else "cuda (as asked)"

    manifest = load_manifest(deployed.manifest)
    model = AnytimeModel(manifest, FallsBack(manifest, device="cpu", threads=1))
    with serving(model, warmup=True) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 30, "/readyz")
        assert c.get("/v1/model").json()["serving"]["device"] == "cpu (after the fallback)"


def test_a_mounted_router_shares_the_model_the_batcher_the_auth_and_the_metrics(
        deployed: Deployed, x: np.ndarray) -> None:
    # How another wire format (the Open Inference Protocol) plugs in: a router factory.
    # (FastAPI resolves the route's string annotations in this module's globals.)
    def fixed_exit_router(ctx: ServerContext) -> APIRouter:
        router = APIRouter(dependencies=ctx.protect)

        @router.post("/v2/exit/{k}")
        async def infer(k: int, request: Request) -> dict[str, Any]:
            async def read(hold: BodyHold) -> bytes:  # charged what it returns
                return await request.body()

            async def decode(body: bytes) -> np.ndarray:
                # The batcher runs what it is given unchecked: check it here, once.
                return check_batch(np.load(io.BytesIO(body)), ctx.model.manifest.input)

            answer = await ctx.predict(ctx.options(exit=k), read, decode)
            return {"exits": answer.result.exits, "batch": answer.batch_size}

        return router

    model = AnytimeModel.load(deployed.manifest, threads=1)
    config = ServeConfig(warmup=False, max_wait_ms=0, token="t0ken")
    app = create_app(model, config, routers=[fixed_exit_router])
    with in_thread(app) as url, client(url) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 30, "/readyz")
        assert c.post("/v2/exit/2", content=npy(x[:3])).status_code == 401
        auth = {"Authorization": "Bearer t0ken"}
        r = c.post("/v2/exit/2", content=npy(x[:3]), headers=auth)
        assert r.status_code == 200 and r.json() == {"exits": [2, 2, 2], "batch": 3}
        r = c.post("/v2/exit/9", content=npy(x[:3]), headers=auth)
        assert r.status_code == 422 and "exit 9 does not exist" in r.json()["detail"]
        metrics = c.get("/metrics", headers=auth).text
    assert 'endpoint="/v2/exit/{k}",status="200"' in metrics
    assert "byot_edge_batch_size_count 1.0" in metrics
    model.close()


def test_a_request_is_validated_once(model: GatedModel, x: np.ndarray,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Options and batch are checked on arrival; the batcher runs them as they are.
    import byot_edge.runtime.anytime as anytime
    import byot_edge.runtime.decode as decode

    calls: list[str] = []

    def counted(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapped

    for module in (anytime, decode):
        monkeypatch.setattr(module, "check_batch", counted("batch", module.check_batch))
    monkeypatch.setattr(PredictOptions, "validate", counted("options", PredictOptions.validate))
    with serving(model) as c:
        calls.clear()
        r = c.post("/v1/predict", content=npy(x[:2]), params={"threshold": 0.5},
                   headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 200, r.text
    assert sorted(calls) == ["batch", "options"]


def test_per_exit_thresholds_given_as_a_list_do_not_stop_the_batcher(
        deployed: Deployed, x: np.ndarray) -> None:
    """The batcher groups requests by their options: a list of thresholds was unhashable,
    the worker died, and every later request got 503."""
    model = AnytimeModel.load(deployed.manifest, threads=1)
    values = [0.5] * (model.num_exits - 1)
    assert PredictOptions(threshold=values) == PredictOptions(threshold=tuple(values))

    async def go() -> tuple[int, bool]:
        batcher = Batcher(model, max_batch=8, max_wait_ms=0)
        batcher.start()
        try:
            answer = await batcher.submit(x[:2], PredictOptions(threshold=values))
            return len(answer.result.indices), batcher.alive
        finally:
            await batcher.close()

    assert asyncio.run(go()) == (2, True)


# -- the fast path (server.fast) --------------------------------------------------------


def _answers(c: httpx.Client, x: np.ndarray) -> list[tuple[int, Any]]:
    """Status and body of a set of requests, timing fields left out."""
    jpost = {"Content-Type": "application/json"}
    npost = {"Content-Type": "application/x-npy"}
    sent = [
        (npy(x[:1]), npost, {}), (npy(x[:3]), npost, {"top_k": 3}),
        (npy(x[:2]), npost, [("threshold", "0.5"), ("threshold", "0.6"), ("threshold", "0.7")]),
        (npy(x[:1]), npost, {"exit": 2, "top_k": 1}),
        (npy(x[0]), npost, {"threshold": "1e-1", "criterion": "entropy"}),
        (json.dumps({"tensor": x[:2].tolist()}).encode(), jpost, {"exit": 3}),
        # refusals: some from the fast path itself, some left to the route
        (npy(x[:1]), npost, {"threshold": 1.5}), (npy(x[:1]), npost, {"exit": 0}),
        (npy(x[:1]), npost, {"exit": "02"}), (npy(x[:1]), npost, {"exit": 2, "threshold": 0.5}),
        (npy(x[:1]), npost, {"nope": 1}), (npy(x[:1]), npost, [("exit", "1"), ("exit", "2")]),
        (npy(x[:1]), npost, {"budget_ms": "inf"}), (npy(x[:1]), npost, {"top_k": 999}),
        (b"\x93NUMPY garbage", npost, {}), (npy(x[:1]), {"Content-Type": "text/plain"}, {}),
        (npy(np.repeat(x[:1], 40, axis=0)), npost, {}), (b"[1, 2", jpost, {}),
    ]
    out = []
    for body, headers, params in sent:
        r = c.post("/v1/predict", content=body, headers=headers, params=params)
        doc = r.json()
        for key in ("latency_ms", "queue_ms", "batch_size"):
            doc.pop(key, None)
        for p in doc.get("predictions", []):
            p.pop("model_ms")
        out.append((r.status_code, doc))
    return out


def test_the_fast_path_answers_as_the_route_does(model: GatedModel, x: np.ndarray,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from byot_edge.runtime.server import fast

    taken: list[int] = []
    original = fast.FastPredict._answer

    async def counted(self: Any, *args: Any) -> bytes:
        taken.append(1)
        return await original(self, *args)

    monkeypatch.setattr(fast.FastPredict, "_answer", counted)
    with serving(model) as c:
        quick = _answers(c, x)
    assert len(taken) == 11  # the 5 answers, the 6 refusals it can give as the route does
    with serving(model, fast_path=False) as c:
        route = _answers(c, x)
    assert len(taken) == 11
    assert quick == route
    statuses = [s for s, _ in quick]
    assert statuses[:6] == [200] * 6 and all(s < 500 for s in statuses), statuses


def test_the_fast_path_leaves_a_wrong_token_to_the_route(model: GatedModel,
                                                         x: np.ndarray) -> None:
    headers = {"Content-Type": "application/x-npy"}
    with serving(model, token="tok") as c:
        r = c.post("/v1/predict", content=npy(x[:1]), headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/predict", content=npy(x[:1]),
                   headers={**headers, "Authorization": "Bearer tok"})
        assert r.status_code == 200
        r = c.post("/v1/predict", content=npy(x[:1]),  # another spelling: the route's call
                   headers={**headers, "Authorization": "bearer tok"})
        assert r.status_code == 200


@pytest.mark.parametrize(("query", "parsed"), [
    (b"", {}),
    (b"threshold=0.5&threshold=1&exit=2&top_k=3", {"threshold": [0.5, 1.0], "exit": 2,
                                                   "top_k": 3}),
    (b"budget_ms=2.5&stat=p90&criterion=margin", {"budget_ms": 2.5, "stat": "p90",
                                                  "criterion": "margin"}),
    (b"threshold=0", None), (b"threshold=nan", None), (b"threshold=", None),
    (b"exit=5", None), (b"exit=-1", None), (b"exit=1.0", None), (b"top_k=11", None),
    (b"budget_ms=0", None), (b"budget_ms=1e999", None), (b"stat=p95", None),
    (b"exit=1&exit=1", None), (b"unknown=1", None), (b"threshold=1_0", None),
])
def test_the_fast_path_parses_only_what_the_route_accepts(query: bytes,
                                                          parsed: dict[str, Any] | None) -> None:
    from byot_edge.runtime.server.fast import parse_query

    assert parse_query(query, num_exits=4, num_classes=10) == parsed


class SlowModel(AnytimeModel):
    """Each run takes `delay` seconds; records its batch sizes."""

    delay = 0.3
    runs: list[int]

    def run_checked(self, x: np.ndarray, options: PredictOptions) -> CascadeResult:
        time.sleep(self.delay)
        self.runs.append(len(x))
        return super().run_checked(x, options)


def test_the_batch_wait_starts_when_the_model_is_free(deployed: Deployed,
                                                      x: np.ndarray) -> None:
    # Under load the oldest waiting request has already waited a whole model run. A wait
    # counted from its arrival had passed before the model was free: the batch ran without
    # the request being received (batches of 1-2 under 32 clients, the issue).
    options = PredictOptions(exit=1)

    async def scenario(model: SlowModel) -> list[int]:
        batcher = Batcher(model, max_batch=8, max_wait_ms=200)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(x[:1], options))  # runs at once
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(batcher.submit(x[1:2], options))  # queued

            async def third() -> Any:
                with batcher.receiving():  # its body arrives 0.1 s after the model is free
                    await asyncio.sleep(0.35)
                return await batcher.submit(x[2:3], options)

            answers = await asyncio.gather(first, second, third())
            return [a.batch_size for a in answers]
        finally:
            await batcher.close()

    with SlowModel.load(deployed.manifest, threads=1) as model:
        model.runs = []
        sizes = asyncio.run(scenario(model))  # type: ignore[arg-type]
    assert model.runs == [1, 2] and sizes == [1, 2, 2]


def test_the_inference_thread_returns_results_and_errors() -> None:
    from byot_edge.runtime.batching import InferenceThread

    thread = InferenceThread()

    async def calls() -> tuple[int, str]:
        value = await thread.call(lambda: 6 * 7)
        with pytest.raises(ZeroDivisionError):
            await thread.call(lambda: 1 // 0)
        return value, await thread.call(lambda: threading.current_thread().name)

    assert asyncio.run(calls()) == (42, "byot-infer")
    thread.shutdown()
    with pytest.raises(BatcherClosed):  # not a future nobody would ever settle
        asyncio.run(thread.call(lambda: 1))


def test_the_v2_routes_serve_the_model_under_its_configured_name(
        model: GatedModel, deployed: Deployed) -> None:
    model.gate.set()
    with serving(model, model_name="cifar-byot.v1") as c:
        assert c.get("/v2/models/cifar-byot.v1/ready").status_code == 200
        meta = c.get("/v2/models/cifar-byot.v1").json()
        assert meta["name"] == "cifar-byot.v1"
        missing = c.get("/v2/models/byot")
        assert missing.status_code == 404 and "'cifar-byot.v1'" in missing.json()["error"]
        x = np.zeros((1, *model.manifest.input.shape), np.float32)
        body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                            "data": x.ravel().tolist()}], "parameters": {"exit": 1}}
        r = c.post("/v2/models/cifar-byot.v1/infer", json=body)
        assert r.status_code == 200 and r.json()["model_name"] == "cifar-byot.v1"
    for bad in ("", "a/b", "-x", "a b"):
        with pytest.raises(ByotError, match="--model-name"):
            ServeConfig(model_name=bad)


V2_GOOD_INPUT = {"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32],
                 "data": [0.0] * 3072}
# Documents a client may send to /v2/.../infer that are not what the protocol says: each
# is a 400 naming the field, never a 500.
V2_MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("request parameters a list", {"inputs": [V2_GOOD_INPUT], "parameters": [1]},
     "parameters"),
    ("request parameters a string", {"inputs": [V2_GOOD_INPUT], "parameters": "x"},
     "parameters"),
    ("input parameters a list", {"inputs": [{**V2_GOOD_INPUT, "parameters": [1]}]},
     "parameters"),
    ("input parameters a string", {"inputs": [{**V2_GOOD_INPUT, "parameters": "x"}]},
     "parameters"),
    ("outputs a number", {"inputs": [V2_GOOD_INPUT], "outputs": 5}, "outputs"),
    ("output parameters a list", {"inputs": [V2_GOOD_INPUT],
                                  "outputs": [{"name": "exit", "parameters": [1]}]},
     "parameters"),
    ("binary_data_size a string", {"inputs": [{**V2_GOOD_INPUT, "data": None,
                                               "parameters": {"binary_data_size": "x"}}]},
     "binary_data_size"),
]


@pytest.mark.parametrize(("doc", "words"), [m[1:] for m in V2_MALFORMED],
                         ids=[m[0] for m in V2_MALFORMED])
def test_malformed_v2_requests_get_400_naming_the_field(model: GatedModel, doc: dict[str, Any],
                                                       words: str) -> None:
    with serving(model) as c:
        r = c.post("/v2/models/byot/infer", json=doc)
        assert r.status_code == 400, r.text
        assert words in r.json()["error"]
        ok = c.post("/v2/models/byot/infer", json={"inputs": [V2_GOOD_INPUT]})
        assert ok.status_code == 200, ok.text


def test_bodies_past_the_server_wide_budget_get_503_before_being_read(
        model: GatedModel, x: np.ndarray) -> None:
    with serving(model, max_upload_mb=0.5, max_bodies_mb=0.5) as c:
        data = npy(x[:1])
        sock = _partial_upload(c, data[:100], 300_000)  # holds 300,000 bytes of the budget
        try:
            wait_until(lambda: gauge(c, "byot_edge_requests_receiving") == 1, 30,
                       "the stalled upload")
            big = npy(np.concatenate([x] * 2)[:24])  # 295,040 bytes: 595,040 > 0.5 MiB
            for path in ("/v1/predict", "/v1/predict?exit=01"):  # the fast path, the route
                r = c.post(path, content=big, headers={"Content-Type": "application/x-npy"})
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                assert "too many uploads" in r.json()["detail"]
            # 61 kB of JSON, whose 12,288 values take 590 kB once parsed: charged for both
            r = c.post("/v1/predict", content=json.dumps(
                {"tensor": np.zeros((4, 3, 32, 32)).tolist()}).encode(),
                headers={"Content-Type": "application/json"})
            assert r.status_code == 503, r.text
            v2 = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [4, 3, 32, 32],
                              "data": [0.0] * 12288}]}
            r = c.post("/v2/models/byot/infer", json=v2)
            assert r.status_code == 503 and "too many uploads" in r.json()["error"], r.text
            r = c.post("/v1/predict", content=data, headers={"Content-Type": "application/x-npy"})
            assert r.status_code == 200, r.text  # a small one still fits beside it
        finally:
            sock.close()
        wait_until(lambda: c.post("/v1/predict", content=big, headers={
            "Content-Type": "application/x-npy"}).status_code == 200, 30, "the budget freed")
        assert 'reason="uploads"' in c.get("/metrics").text


def test_serve_bounds_uvicorn_s_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from byot_edge.cli.serve import run_uvicorn

    configs: list[Any] = []

    class Server:  # records the config instead of serving
        def __init__(self, config: Any) -> None:
            configs.append(config)
            self.started = True

        def run(self) -> None:
            pass

    monkeypatch.setattr(uvicorn, "Server", Server)
    run_uvicorn(object(), host="127.0.0.1", port=1, log_level="warning",
                shutdown_timeout_s=1, max_connections=ServeConfig().max_connections)
    assert configs[0].limit_concurrency == 1024
    r = CliRunner().invoke(cli_app, ["serve", "/nonexistent/manifest.json", "--max-upload-mb",
                                     "20", "--max-bodies-mb", "10"])
    assert r.exit_code == 2 and "--max-bodies-mb" in r.output
