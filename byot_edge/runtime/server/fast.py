"""POST /v1/predict in plain ASGI: the hot path, without FastAPI's per-request machinery.

A profile under load (docs/serving.md) put most of a request's server CPU in the web
framework, not in the model: FastAPI's dependency solving and query validation, its
response-model validation and serialisation, its native-telemetry check (an environment
lookup per request), the middleware stack. This path does for a prediction what the
FastAPI route does, with the same context (`ServerContext.predict`: 503s, the queue, the
batcher), the same decoder and the same answer bytes (`encode`), and records the same
metrics.

It takes a request only when it is sure to answer it as the route would: a query whose
every parameter parses cleanly and within range, an `Authorization` header exactly
`Bearer <token>` when a token is set, and a body that is not multipart. Anything else (a
bad or unknown parameter, a wrong token, multipart uploads) goes to the FastAPI route,
which answers it with its own messages, so every refusal reads as before.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool

from byot_edge.errors import ByotError
from byot_edge.runtime.decode import (
    MULTIPART_TYPE,
    decode_body,
    decode_bytes,
    decodes_inline,
    max_body,
    media_type,
)
from byot_edge.runtime.policies import CRITERIA
from byot_edge.runtime.server.budget import BodyHold
from byot_edge.runtime.server.context import ServerContext
from byot_edge.runtime.server.deadlines import HEADER, MAX_DEADLINE_MS
from byot_edge.runtime.server.encode import JSON_HEADERS, error_parts, predict_document, to_json
from byot_edge.runtime.server.http import Receive, read_asgi_body
from byot_edge.timing import STATS

log = logging.getLogger("uvicorn.error.byot_edge")

PATH = "/v1/predict"
# What pydantic parses to the same number; anything else goes to the route to be judged.
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_INT = re.compile(r"[1-9]\d{0,8}\Z")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _float(text: str) -> float | None:
    if not _FLOAT.match(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def parse_query(query: bytes, num_exits: int, num_classes: int) -> dict[str, Any] | None:
    """The prediction options of a query string, or None unless every parameter is known,
    given once (threshold: any number of times), and valid as the route declares it."""
    out: dict[str, Any] = {}
    thresholds: list[float] = []
    for key, text in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == "threshold":
            t = _float(text)
            if t is None or not 0 < t <= 1:
                return None
            thresholds.append(t)
            continue
        if key in out:
            return None
        if key in ("budget_ms", "deadline_ms"):
            value: Any = _float(text)
            ok = value is not None and value > 0 and (
                key == "budget_ms" or value <= MAX_DEADLINE_MS)
        elif key in ("exit", "top_k"):
            value = int(text) if _INT.match(text) else None
            ok = value is not None and value <= (num_exits if key == "exit" else num_classes)
        elif key in ("criterion", "stat"):
            value = text
            ok = text in (CRITERIA if key == "criterion" else STATS)
        else:
            return None
        if not ok:
            return None
        out[key] = value
    if thresholds:
        out["threshold"] = thresholds
    return out


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


class FastPredict:
    """The hot path of POST /v1/predict (see the module's docstring). `takes(scope)` says
    whether it answers a request; `__call__` answers it."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        config, model = ctx.config, ctx.model
        self.token = None if config.token is None else b"Bearer " + config.token.encode()
        self.num_exits, self.class_names = model.num_exits, list(model.class_names)
        self.spec, self.limits = model.manifest.input, config.limits

    def takes(self, scope: Scope) -> dict[str, Any] | None:
        """The parsed query when this path answers the request, else None."""
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return None
        if self.token is not None and not hmac.compare_digest(
                _header(scope, b"authorization") or b"", self.token):
            return None  # the route answers 401 (or accepts another spelling of Bearer)
        media = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
        if media == MULTIPART_TYPE.encode():
            return None
        query = parse_query(scope.get("query_string", b""), self.num_exits,
                            len(self.class_names))
        header = _header(scope, HEADER.encode())
        if query is not None and header is not None:
            value = _float(header.decode("latin-1"))
            if value is None or not 0 < value <= MAX_DEADLINE_MS:
                return None  # the route answers 400 with its message
            query["deadline_ms"] = min(value, query.get("deadline_ms", value))
        return query

    async def __call__(self, scope: Scope, receive: Receive, send: Send,
                       query: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            status, body, headers = 200, await self._answer(scope, receive, query, t0), []
        except Exception as exc:
            if not isinstance(exc, ByotError):  # a bug: a 500, its traceback in the log
                log.exception("a prediction request failed")
            status, body, headers = error_parts(exc)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})
        self.ctx.metrics.observe_request(PATH, status, time.perf_counter() - t0)

    async def _answer(self, scope: Scope, receive: Receive, query: dict[str, Any],
                      t0: float) -> bytes:
        ctx, config = self.ctx, self.ctx.config
        options = ctx.options(query.get("threshold"), query.get("budget_ms"),
                              query.get("exit"), query.get("criterion"),
                              query.get("stat", "p50"))
        media = media_type((_header(scope, b"content-type") or b"").decode("latin-1"))
        spec, limits = self.spec, self.limits

        limit, too_big = max_body(media, spec, limits, config.max_upload_bytes)

        async def read(hold: BodyHold) -> bytes:
            body = await read_asgi_body(receive, _header(scope, b"content-length"), limit,
                                        config.body_timeout_s, hold, too_big)
            hold.reserve(len(body) + decode_bytes(media, body, spec, limits))  # 503 if spent
            return body

        async def decode(body: bytes) -> Any:
            if decodes_inline(media, len(body)):
                return decode_body(media, body, None, spec, limits)
            # parsing JSON and decoding images take long enough to stall the loop
            return await run_in_threadpool(decode_body, media, body, None, spec, limits)

        answer = await ctx.predict(options, read, decode, query.get("deadline_ms"))
        k = query.get("top_k") or min(config.default_top_k, len(self.class_names))
        return to_json(predict_document(answer, self.class_names, k, t0))
