"""The web layer's plumbing: reading bodies under the server's limits, multipart parts,
the bearer-token check, the metrics middleware, and errors as JSON responses.

Here a RequestError becomes its status (with Retry-After for 503), any other ByotError 422,
FastAPI's own validation errors 422 with one readable line, and a bug 500.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, which
# name local variables (bounds, dependencies), at run time.

import asyncio
import hmac
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile

from byot_edge.errors import ByotError, RequestError
from byot_edge.runtime.metrics import ServerMetrics
from byot_edge.runtime.server.budget import BodyHold
from byot_edge.runtime.server.encode import error_parts

# nginx's code for "the client closed the connection before the answer": never sent, but
# the metrics count it apart from the server's own failures (500).
CLIENT_CLOSED = 499
# The ASGI receive callable: the next message of a request (body chunks, or a disconnect).
Receive = Callable[[], Awaitable[dict[str, Any]]]


async def read_body(request: Request, limit: int, timeout_s: float,
                    hold: BodyHold | None = None, too_big: str | None = None) -> bytes:
    """The body of a routed request, under the limits of `read_asgi_body`."""
    return await read_asgi_body(request.receive, request.headers.get("content-length", "")
                                .encode("latin-1"), limit, timeout_s, hold, too_big)


async def read_asgi_body(receive: Receive, declared: bytes | None, limit: int,
                         timeout_s: float, hold: BodyHold | None = None,
                         too_big: str | None = None) -> bytes:
    """The body from ASGI messages under the limits: 413 (`too_big`, or the upload limit's
    message) when the declared length is over `limit`, before anything is read, or as soon
    as what arrived is; 408 after `timeout_s`; 499 if the client left. `hold` reserves the
    bytes in the server's body budget (503 when it is spent), the declared length up front,
    then what arrives."""
    over = RequestError(413, too_big or f"the upload is over the server's limit of "
                                        f"{limit / 2**20:g} MiB; send a smaller image or tensor")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise over
        if hold is not None:
            hold.reserve(int(declared))

    async def read() -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(CLIENT_CLOSED, "the client disconnected before its "
                                                  "request body arrived")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise over
            if hold is not None:
                hold.reserve(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    try:
        if sys.version_info >= (3, 11):  # a timeout scope: no task per request
            async with asyncio.timeout(timeout_s):
                return await read()
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout_s:g} s; "
                                "send it in one go (the server's --body-timeout-s)") from None


async def form_parts(request: Request, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """The `file` parts of a multipart body (already read and size-checked), as
    (a name for messages, bytes)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=16)
    except Exception as e:  # starlette < 0.50 lets python-multipart's parse errors through
        if type(e).__name__ != "MultipartParseError":
            raise
        raise RequestError(400, f"the multipart body is malformed ({e}); upload an image with "
                                "curl -F file=@cat.png") from None
    try:
        extra = sorted({k for k in form if k != "file"})
        if extra:
            raise RequestError(422, f"unexpected form field(s) {extra}: upload images as "
                                    "`file` parts and pass options in the query string, e.g. "
                                    "/v1/predict?threshold=0.9")
        parts = []
        for i, item in enumerate(form.getlist("file")):
            if not isinstance(item, UploadFile):
                raise RequestError(422, "the `file` field must be a file upload (curl -F "
                                        "file=@cat.png), not a text field")
            name = f"the upload {item.filename!r}" if item.filename else f"upload #{i + 1}"
            parts.append((name, await item.read()))
    finally:
        await form.close()
    if not parts:
        raise RequestError(422, "the multipart body has no `file` part; upload an image with "
                                "curl -F file=@cat.png")
    return parts


def bearer_auth(token: str) -> Callable[..., Awaitable[None]]:
    """A dependency answering 401 unless `Authorization: Bearer <token>`."""
    expected = token.encode()
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token>, the "
                                                      "server's --token or BYOT_EDGE_TOKEN")

    async def check(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                           Depends(bearer)]) -> None:
        # Headers arrive latin-1 decoded; compare the raw bytes, in constant time.
        given = credentials.credentials.encode("latin-1") if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong bearer token; send the header "
                                     "Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


class Observe:
    """ASGI middleware: every response's status and time go to the metrics."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            self.metrics.observe_request(endpoint, status, time.perf_counter() - t0)


def _describe(error: Any) -> str:
    """One validation error as `threshold[0]: Input should be ... (got '1.5')`."""
    loc = [p for p in error.get("loc", ()) if p not in ("query", "body", "header")]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    got = f" (got {error['input']!r})" if isinstance(error.get("input"), str | int | float) else ""
    return f"{where or 'request'}: {error.get('msg', 'invalid')}{got}"


def _answer(exc: Exception) -> Response:
    """The same answer as the fast path gives (encode.error_parts)."""
    status, body, headers = error_parts(exc)
    return Response(body, status_code=status, media_type="application/json",
                    headers={k.decode(): v.decode() for k, v in headers})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> Response:
        return _answer(exc)

    @app.exception_handler(ByotError)
    async def byot_error(request: Request, exc: ByotError) -> Response:
        return _answer(exc)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        # A bug, not the client's fault: a JSON 500 (the traceback goes to the log).
        return _answer(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "; ".join(_describe(e) for e in exc.errors())},
                            status_code=422)
