"""Crafted and oversized requests, unit by unit (no server): .npy headers, /v2 documents,
the bytes of bodies held at once, the cost of parsing JSON, the inference thread's stop.
Every refusal is a RequestError (a 4xx, or a 503 for overload) that says what to do."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from typing import Any

import numpy as np
import pytest

import byot_edge.runtime.decode as decode
from byot_edge.errors import ByotError, RequestError
from byot_edge.manifest import InputSpec
from byot_edge.runtime.batching import BatcherClosed, InferenceThread
from byot_edge.runtime.decode import (
    NPY_HEADER_BYTES,
    Limits,
    decode_body,
    decode_bytes,
    max_body,
)
from byot_edge.runtime.server import ServeConfig
from byot_edge.runtime.server.budget import BodyBudget
from byot_edge.runtime.server.http import Receive, read_asgi_body
from byot_edge.runtime.server.oip import decode_request

SPEC = InputSpec(shape=[3, 4, 4], dtype="float32", mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
LIMITS = Limits(max_samples=8, max_image_pixels=4096)


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def negative_shape_npy() -> bytes:
    """A .npy header saying (-2, -6), whose product (12 values, 48 bytes) the data matches."""
    body = npy(np.zeros((2, 6), np.float32))
    crafted = body.replace(b"(2, 6), }  ", b"(-2, -6), }")
    assert len(crafted) == len(body) and b"(-2, -6)" in crafted
    return crafted


@pytest.mark.parametrize("body", [negative_shape_npy(),
                                  npy(np.zeros((2, 6), np.float32)).replace(b"(2, 6), }",
                                                                            b"(-12,), }")],
                         ids=["two negative dims", "one negative dim"])
def test_a_npy_header_with_a_negative_dimension_is_a_400(body: bytes) -> None:
    with pytest.raises(RequestError) as e:
        decode_body("application/x-npy", body, None, SPEC, LIMITS)
    assert e.value.status == 400 and "negative" in e.value.detail


# -- the body budget: bytes held at once, server-wide ----------------------------------------


def test_the_body_budget_refuses_past_its_limit_unless_a_request_is_alone() -> None:
    budget = BodyBudget(1000)
    with budget.hold() as alone:
        alone.reserve(5000)  # alone in the server: any body under the upload limit
        assert budget.held == 5000
    assert budget.held == 0
    with budget.hold() as first, budget.hold() as second:
        first.reserve(600)
        second.reserve(300)
        with pytest.raises(RequestError) as e:
            second.reserve(500)  # 600 + 500 > 1000 while the first holds bytes
        assert e.value.status == 503 and e.value.retry_after == 1
        assert "too many uploads" in e.value.detail and "--max-bodies-mb" in e.value.detail
        assert (budget.held, second.bytes) == (900, 300)  # nothing reserved by a refusal
        second.reserve(200)  # less than it holds: nothing changes
        assert budget.held == 900
    assert budget.held == 0


def _receive(chunks: list[bytes]) -> tuple[Receive, list[int]]:
    """An ASGI receive over `chunks`, and a list counting the calls."""
    calls: list[int] = []

    async def receive() -> dict[str, Any]:
        calls.append(1)
        i = len(calls) - 1
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    return receive, calls


def test_a_declared_length_the_budget_cannot_hold_is_refused_before_reading() -> None:
    budget = BodyBudget(1000)
    receive, calls = _receive([b"x" * 600])
    with budget.hold() as other, budget.hold() as hold:
        other.reserve(500)
        with pytest.raises(RequestError) as e:
            asyncio.run(read_asgi_body(receive, b"600", 10_000, 5, hold))
        assert e.value.status == 503 and not calls


def test_a_chunked_body_is_charged_as_it_arrives() -> None:
    budget = BodyBudget(1000)
    receive, calls = _receive([b"x" * 300] * 3)
    with budget.hold() as other, budget.hold() as hold:
        other.reserve(500)
        with pytest.raises(RequestError) as e:
            asyncio.run(read_asgi_body(receive, None, 10_000, 5, hold))
        assert e.value.status == 503 and len(calls) == 2  # 500 + 600 > 1000


def test_a_npy_body_longer_than_max_samples_can_be_is_413_before_reading() -> None:
    limit, message = max_body("application/x-npy", SPEC, LIMITS, 2**20)
    assert len(npy(np.zeros((8, 3, 4, 4), np.float32))) <= limit
    too_long = len(npy(np.zeros((9, 3, 4, 4), np.float32))) + NPY_HEADER_BYTES
    receive, calls = _receive([b""])
    with pytest.raises(RequestError) as e:
        asyncio.run(read_asgi_body(receive, str(too_long).encode(), limit, 5, None, message))
    assert e.value.status == 413 and "at most 8" in e.value.detail and not calls
    assert max_body("image/png", SPEC, LIMITS, 2**20) == (2**20, None)


def test_the_server_wide_body_budget_by_default_holds_four_uploads_and_64_mib() -> None:
    assert ServeConfig().max_bodies_bytes == 64 * 2**20
    assert ServeConfig(max_upload_mb=100).max_bodies_bytes == 400 * 2**20
    assert ServeConfig(max_bodies_mb=12).max_bodies_bytes == 12 * 2**20
    with pytest.raises(ByotError, match="--max-bodies-mb"):
        ServeConfig(max_upload_mb=20, max_bodies_mb=10)


# -- the cost of parsing JSON --------------------------------------------------------------


def test_a_json_body_with_more_values_than_a_request_holds_is_413_unparsed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parse(*_: Any, **__: Any) -> Any:
        raise AssertionError("parsed")

    # 8 samples of 3 * 4 * 4 values, and one more sample
    body = json.dumps({"tensor": np.zeros((9, 3, 4, 4)).tolist()}).encode()
    monkeypatch.setattr(decode.json, "loads", no_parse)
    with pytest.raises(RequestError) as e:
        decode_body("application/json", body, None, SPEC, LIMITS)
    assert e.value.status == 413 and ".npy" in e.value.detail
    monkeypatch.undo()
    ok = json.dumps({"tensor": np.zeros((8, 3, 4, 4)).tolist()}).encode()
    assert decode_body("application/json", ok, None, SPEC, LIMITS).shape == (8, 3, 4, 4)


def test_decoding_is_charged_what_it_allocates() -> None:
    body = json.dumps({"tensor": np.zeros((2, 3, 4, 4)).tolist()}).encode()
    assert decode_bytes("application/json", body, SPEC, LIMITS) == 48 * 96  # 96 values
    huge = b"[" + b"0," * 10_000 + b"0]"  # refused unparsed: charged what a request holds
    assert decode_bytes("application/json", huge, SPEC, LIMITS) == 48 * (8 * 48 + 16)
    assert decode_bytes("application/x-npy", b"x" * 100, SPEC, LIMITS) == 100  # its copy
    assert decode_bytes("image/png", b"x" * 100, SPEC, LIMITS) == 0  # pixel limits


def test_a_v2_json_header_with_more_values_than_a_request_holds_is_413() -> None:
    doc = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [9, 3, 4, 4],
                       "data": [0.0] * (9 * 48 + 1024)}]}
    body = json.dumps(doc).encode()
    with pytest.raises(RequestError) as e:
        decode_request(body, None, 8 * 48 + 1024)
    assert e.value.status == 413
    assert decode_request(body, None, 9 * 48 + 1030)[0] == doc


# -- the inference thread's stop -------------------------------------------------------------


def test_a_call_racing_the_shutdown_is_refused_not_left_waiting() -> None:
    """The interleaving that lost a call: `call` saw the thread running, then `shutdown`
    queued its stop, then `call` queued behind it, where nobody would ever run it. Here the
    shutdown runs exactly there: when `call` makes its future."""
    thread = InferenceThread()

    async def scenario() -> None:
        assert await thread.call(lambda: 1) == 1  # started
        loop = asyncio.get_running_loop()
        make_future = loop.create_future

        def shutdown_then_make() -> asyncio.Future[Any]:
            if sys._getframe(1).f_code is InferenceThread.call.__code__:
                loop.create_future = make_future  # type: ignore[method-assign]
                thread.shutdown()  # the stop goes in now; the thread exits
            return make_future()

        loop.create_future = shutdown_then_make  # type: ignore[method-assign]
        task = asyncio.ensure_future(thread.call(lambda: 2))
        for _ in range(10):  # a few turns of the loop: it is refused at its first step
            await asyncio.sleep(0)
        loop.create_future = make_future  # type: ignore[method-assign]
        if not task.done():
            task.cancel()
        assert task.done() and not task.cancelled(), "the call was left waiting forever"
        assert isinstance(task.exception(), BatcherClosed)

    asyncio.run(scenario())
