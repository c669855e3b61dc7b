"""The HTTP server: FastAPI over the anytime model, with dynamic batching.

    model = AnytimeModel.load("deploy/manifest.json", backend="onnxruntime")
    app = create_app(model, ServeConfig(max_batch=32, max_wait_ms=2))   # in-process, tests
    serve(model, ServeConfig(), host="127.0.0.1", port=8080)            # uvicorn, the CLI

Endpoints: POST /v1/predict, GET /v1/model, GET /healthz, GET /readyz, GET /metrics, and the
OpenAPI schema (/openapi.json, /docs). docs/serving.md describes them for users.

Only this module (and the CLI command that calls it) imports fastapi; the rest of the
package never imports it. Here a ByotError becomes an HTTP status: 422 with its message.
"""

import asyncio
import hmac
import io
import json
import logging
import math
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np

from byot_edge import __version__
from byot_edge.errors import ByotError, missing_dependency

try:
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, Field
    from starlette.datastructures import UploadFile
    from starlette.requests import ClientDisconnect
except ImportError:
    raise missing_dependency("fastapi", "serve", "to serve models") from None

from byot_edge.manifest import InputSpec
from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
from byot_edge.runtime.batching import Answer, Batcher, BatcherClosed
from byot_edge.runtime.metrics import ServerMetrics
from byot_edge.runtime.preprocess import check_batch, load_image, normalise

log = logging.getLogger("uvicorn.error.byot_edge")  # shows in uvicorn's log format

QUERY_OPTIONS = ("threshold", "budget_ms", "exit", "top_k", "criterion", "stat")
NPY_MAGIC = b"\x93NUMPY"
NPY_TYPES = ("application/x-npy", "application/octet-stream")
INLINE_NPY_BYTES = 2**20


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 32  # samples per model run
    max_wait_ms: float = 2.0  # longest the oldest request waits for ones being received
    max_queue: int = 64  # requests held at once once their body is in (decoding, queued, running)
    max_upload_mb: float = 10.0
    token: str | None = None  # bearer token for /v1/* and /metrics; None: no auth
    max_image_pixels: int = 4096 * 4096  # decoded size limit: a small PNG can be huge
    max_request_pixels: int = 2 * 4096 * 4096  # all of one request's images together
    body_timeout_s: float = 30.0  # the whole body must arrive within this (408 after)
    default_top_k: int = 5
    warmup: bool = True
    shutdown_timeout_s: int = 30  # how long SIGTERM waits for in-flight requests

    def __post_init__(self) -> None:
        checks = {"max_batch": self.max_batch >= 1, "max_wait_ms": self.max_wait_ms >= 0,
                  "max_queue": self.max_queue >= 1, "max_upload_mb": self.max_upload_mb > 0,
                  "max_image_pixels": self.max_image_pixels >= 1,
                  "max_request_pixels": self.max_request_pixels >= 1,
                  "body_timeout_s": self.body_timeout_s > 0,
                  "default_top_k": self.default_top_k >= 1,
                  "shutdown_timeout_s": self.shutdown_timeout_s >= 0}
        bad = [f"{k} (--{k.replace('_', '-')} {getattr(self, k)})"
               for k, ok in checks.items() if not ok]
        if bad:
            raise ByotError(f"invalid server settings: {', '.join(bad)} out of range "
                            "(max_wait_ms and shutdown_timeout_s >= 0, the others positive)")
        if self.token is not None and not self.token.strip():
            raise ByotError("the bearer token is empty; pass a non-empty --token or unset "
                            "BYOT_EDGE_TOKEN")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


# -- response schemas (they are also the OpenAPI documentation) ---------------------------


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong and how to fix it.")


class TopClass(BaseModel):
    index: int
    label: str
    probability: float


class PredictionOut(BaseModel):
    index: int = Field(description="Class index.")
    label: str = Field(description="Class name.")
    confidence: float = Field(description="Probability of the class at the exit that answered "
                                          "(temperature-scaled when calibrated so).")
    exit: int = Field(description="The exit that answered, 1..K (K is the deepest).")
    top_k: list[TopClass] = Field(description="The most probable classes at that exit.")
    model_ms: float = Field(description="Time in the model until this sample was answered, "
                                        "from the start of its batch.")


class PredictResponse(BaseModel):
    predictions: list[PredictionOut] = Field(description="One per sample, in input order.")
    mode: str = Field(description="cascade, deadline, budget or exit.")
    latency_ms: float = Field(description="Server-side time from the request's arrival to "
                                          "its answer (reading, decoding, queue, model).")
    queue_ms: float = Field(description="Time waiting for its batch to start.")
    batch_size: int = Field(description="Samples in the model run that answered it.")
    warnings: list[str] = Field(default_factory=list)


class ExitInfo(BaseModel):
    index: int
    stage: str
    flops: int = Field(description="FLOPs of the path to this exit, per sample.")
    params: int
    val_accuracy: float | None
    threshold: float | None = Field(description="Calibrated confidence threshold (None for "
                                                "the deepest exit, which always answers).")
    files: list[str] = Field(description="Kinds of exported files this exit has.")


class InputInfo(BaseModel):
    shape: list[int]
    dtype: str
    layout: str
    mean: list[float]
    std: list[float]


class ThresholdsInfo(BaseModel):
    criterion: str
    values: list[float]
    temperatures: list[float] | None
    source: str
    expected: dict[str, Any]


class LatencyProfileInfo(BaseModel):
    backend: str
    device: str
    batch: int
    exits: list[dict[str, Any]] = Field(description="Per exit: ms for its truncated file and "
                                                    "its segment (p50, p90, p99, mean).")
    created: str


class ServingInfo(BaseModel):
    backend: str
    device: str
    max_batch: int
    max_wait_ms: float
    max_queue: int
    max_upload_mb: float
    auth: bool


class ModelInfo(BaseModel):
    arch: str
    dataset: str
    num_exits: int
    num_classes: int
    class_names: list[str]
    input: InputInfo
    exits: list[ExitInfo]
    thresholds: ThresholdsInfo | None
    latency_profiles: list[LatencyProfileInfo]
    serving: ServingInfo


class Status(BaseModel):
    status: str


def model_info(model: AnytimeModel, config: ServeConfig) -> ModelInfo:
    m = model.manifest
    th = m.thresholds
    return ModelInfo(
        arch=str(m.model.get("arch", "")), dataset=m.dataset, num_exits=m.num_exits,
        num_classes=len(m.class_names), class_names=list(m.class_names),
        input=InputInfo(shape=list(m.input.shape), dtype=m.input.dtype, layout=m.input.layout,
                        mean=list(m.input.mean), std=list(m.input.std)),
        exits=[ExitInfo(index=e.index, stage=e.stage, flops=e.flops, params=e.params,
                        val_accuracy=e.val_accuracy,
                        threshold=th.values[e.index - 1] if th and e.index < m.num_exits
                        else None,
                        files=sorted(e.files)) for e in m.exits],
        thresholds=ThresholdsInfo(criterion=th.criterion, values=th.values,
                                  temperatures=th.temperatures, source=th.source,
                                  expected=th.expected) if th else None,
        latency_profiles=[LatencyProfileInfo(backend=p.backend, device=p.device, batch=p.batch,
                                             exits=p.exits, created=p.created)
                          for p in m.latency_profiles],
        serving=ServingInfo(backend=model.backend.name, device=model.backend.device,
                            max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                            max_queue=config.max_queue, max_upload_mb=config.max_upload_mb,
                            auth=config.token is not None),
    )


# -- reading and decoding a request -------------------------------------------------------


def _problem(status: int, detail: str, retry_after: float | None = None) -> HTTPException:
    headers = (None if retry_after is None
               else {"Retry-After": str(max(1, math.ceil(retry_after)))})
    return HTTPException(status, detail, headers=headers)


# nginx's code for "the client closed the connection before the answer": never sent, but
# the metrics count it apart from the server's own failures (500).
CLIENT_CLOSED = 499


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, or 413 as soon as it is known to be over `limit` bytes, 408 when it has
    not all arrived within `timeout_s` (a slow or stalled client), 499 if the client left."""
    too_big = _problem(413, f"the upload is over the server's limit of {limit / 2**20:g} MiB; "
                            "send a smaller image or tensor")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise _problem(408, f"the request body did not arrive within {timeout_s:g} s; send "
                            "it in one go (the server's --body-timeout-s)") from None
    except ClientDisconnect:
        raise _problem(CLIENT_CLOSED, "the client disconnected before its request body "
                                      "arrived") from None


async def _form_parts(request: Request, body: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """The `file` parts of a multipart body, as (filename, bytes)."""

    async def replay() -> dict[str, Any]:  # the body is already read (and size-checked)
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=max_files, max_fields=16)
    try:
        extra = sorted({k for k in form if k != "file"})
        if extra:
            raise _problem(422, f"unexpected form field(s) {extra}: upload images as `file` "
                                "parts and pass options in the query string, e.g. "
                                "/v1/predict?threshold=0.9")
        parts = []
        for i, item in enumerate(form.getlist("file")):
            if not isinstance(item, UploadFile):
                raise _problem(422, "the `file` field must be a file upload (curl -F "
                                    "file=@cat.png), not a text field")
            name = f"the upload {item.filename!r}" if item.filename else f"upload #{i + 1}"
            parts.append((name, await item.read()))
    finally:
        await form.close()
    if not parts:
        raise _problem(422, "the multipart body has no `file` part; upload an image with "
                            "curl -F file=@cat.png")
    return parts


# What uploads may be: Pillow opens dozens of formats, some with decoders of their own
# (EPS runs Ghostscript); a classifier's clients send these.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def _not_image(what: str) -> HTTPException:
    return _problem(422, f"{what} is not an image the server can read; send a PNG or JPEG "
                         "file (or a tensor as JSON or .npy)")


def _image_pixels(data: bytes, spec: InputSpec, what: str, max_pixels: int) -> int:
    """w * h from the image's header (nothing decoded yet): 413 over `max_pixels`."""
    from PIL import Image

    # Pillow's decoders raise many exception types on corrupt input (OSError, SyntaxError,
    # ValueError, struct.error, DecompressionBombError...): all mean "not an image we read".
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:  # the header only
            w, h = img.size
    except Exception:
        raise _not_image(what) from None
    if w * h > max_pixels:
        raise _problem(413, f"{what} is {w}x{h} pixels, over the server's limit of "
                            f"{max_pixels} pixels; resize it to {spec.shape[2]}x{spec.shape[1]} "
                            "before sending")
    return w * h


def _image(data: bytes, spec: InputSpec, what: str) -> np.ndarray:
    """uint8 [C, H, W] from image bytes (sized by _image_pixels first), decoded exactly as
    `load_image` decodes files."""
    try:
        return load_image(io.BytesIO(data), spec, formats=IMAGE_FORMATS)  # type: ignore[arg-type]
    except Exception:
        raise _not_image(what) from None


def _npy(data: bytes, what: str) -> np.ndarray:
    """A .npy payload, checked before anything is allocated from its header."""
    f = io.BytesIO(data)
    bad = f"{what} is not a valid .npy file"
    # numpy parses the header with Python's tokenizer and literal_eval: on crafted bytes
    # they raise ValueError, SyntaxError, tokenize.TokenError, TypeError...; all mean "bad".
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"version {version} is not supported")
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
    except Exception as e:
        raise _problem(400, f"{bad} ({str(e)[:200]}); save it with numpy.save") from None
    if dtype.hasobject:
        raise _problem(422, f"{what} holds Python objects; send a numeric array")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data) - f.tell():
        raise _problem(400, f"{bad}: its header says {list(shape)} {dtype} ({expected} bytes) "
                            f"but it holds {len(data) - f.tell()} bytes")
    order = "F" if fortran else "C"
    x = np.frombuffer(data, dtype, offset=f.tell()).reshape(shape, order=order).copy()
    if x.dtype.byteorder == ">" and x.dtype.kind == "f":
        x = x.astype(x.dtype.newbyteorder("="))  # big-endian floats: same values, native order
    return x


def _json_tensor(body: bytes) -> np.ndarray:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise _problem(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "tensor" not in doc:
        raise _problem(422, 'expected a JSON object {"tensor": [...]} holding one sample '
                            "[C, H, W] or a batch [N, C, H, W] of normalised values")
    extra = sorted(set(doc) - {"tensor"})
    if extra:
        raise _problem(422, f"unexpected key(s) {extra} in the JSON body; it holds only "
                            '"tensor"; pass options in the query string, e.g. '
                            "/v1/predict?threshold=0.9")
    try:
        x = np.asarray(doc["tensor"])
    except (ValueError, TypeError, RecursionError, OverflowError):
        x = np.asarray(None)  # ragged: reported just below
    if x.dtype.kind not in "iuf" or x.ndim == 0:
        raise _problem(422, '"tensor" must be a nested list of numbers with a regular shape, '
                            "[C, H, W] or [N, C, H, W]")
    return x


def _tensor(x: np.ndarray, spec: InputSpec, from_json: bool = False) -> np.ndarray:
    if x.ndim == 3:  # one sample; the API takes it as a batch of one
        x = x[None]
    if from_json:  # JSON numbers carry no dtype: they are the manifest's
        with np.errstate(over="ignore", invalid="ignore"):
            x = x.astype(spec.dtype)
    return check_batch(x, spec)


def decode_inputs(media_type: str, body: bytes, parts: list[tuple[str, bytes]] | None,
                  spec: InputSpec, max_pixels: int,
                  max_request_pixels: int | None = None) -> np.ndarray:
    """A request's samples as the checked batch the model takes (blocking: run in a thread).
    Images are sized from their headers first: each must fit `max_pixels`, all together
    `max_request_pixels`, before any is decoded (a small upload can decode to gigabytes)."""
    if media_type == "application/json":
        return _tensor(_json_tensor(body), spec, from_json=True)
    if media_type in NPY_TYPES:
        return _tensor(_npy(body, "the body"), spec)
    if parts is None:  # a raw image body
        parts = [("the body", body)]
    if spec.shape[0] not in (1, 3) and not all(d.startswith(NPY_MAGIC) for _, d in parts):
        raise _problem(422, f"the model takes {spec.shape[0]}-channel input, not images; send "
                            "a tensor as JSON or .npy")
    images = [(name, data) for name, data in parts if not data.startswith(NPY_MAGIC)]
    total = sum(_image_pixels(data, spec, name, max_pixels) for name, data in images)
    if max_request_pixels is not None and total > max_request_pixels:
        raise _problem(413, f"the request's {len(images)} images hold {total} pixels together, "
                            f"over the server's limit of {max_request_pixels} per request; "
                            "send fewer or "
                            f"smaller images (e.g. resized to {spec.shape[2]}x{spec.shape[1]})")
    arrays = []
    for name, data in parts:
        if data.startswith(NPY_MAGIC):
            arrays.append(_tensor(_npy(data, name), spec))
        else:
            arrays.append(normalise(_image(data, spec, name)[None], spec))
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


# -- the app ------------------------------------------------------------------------------


def _describe(error: Any) -> str:
    """One validation error as `threshold[0]: Input should be ... (got '1.5')`."""
    loc = [p for p in error.get("loc", ()) if p not in ("query", "body", "header")]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    got = f" (got {error['input']!r})" if isinstance(error.get("input"), str | int | float) else ""
    return f"{where or 'request'}: {error.get('msg', 'invalid')}{got}"


class _Observe:
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


@dataclass
class _State:
    batcher: Batcher | None = None
    ready: bool = False
    not_ready: str = "warming up"
    admitted: int = 0


def _auth(token: str) -> Callable[..., Awaitable[None]]:
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


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body cannot be parsed (bad JSON, .npy "
                                                 "or multipart)."},
    408: {"model": ErrorResponse, "description": "The body did not all arrive within the "
                                                 "server's body timeout."},
    413: {"model": ErrorResponse, "description": "The upload, an image's pixel count, the "
                                                 "request's pixels together or the number of "
                                                 "samples is over the limit."},
    415: {"model": ErrorResponse, "description": "The content type is not one of those below."},
    422: {"model": ErrorResponse, "description": "Not an image, wrong tensor shape or dtype, "
                                                 "NaN, or options out of range."},
    503: {"model": ErrorResponse, "description": "Queue full, warming up or shutting down; "
                                                 "retry after the Retry-After header's seconds."},
}
AUTH_ERROR: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."}}

REQUEST_BODY = {
    "required": True,
    "description": "One image (multipart `file` part, or the raw bytes with an image/* "
                   "type), several `file` parts, or a tensor of normalised values as the "
                   "manifest's input spec says: JSON {\"tensor\": [...]} or a .npy file, one "
                   "sample [C, H, W] or a batch [N, C, H, W] (N <= max batch).",
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "array", "items": {"type": "string",
                                                               "format": "binary"}}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {
            "type": "object", "required": ["tensor"], "additionalProperties": False,
            "properties": {"tensor": {"type": "array", "items": {}}}}},
        "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
    },
}

Threshold = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


def create_app(model: AnytimeModel, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model`. Its lifespan starts the batching worker and warms
    the model up in it; /readyz answers 200 once that is done."""
    config = config or ServeConfig()
    spec = model.manifest.input
    num_exits, num_classes = model.num_exits, len(model.class_names)
    metrics = ServerMetrics(num_exits)
    state = _State()
    info = model_info(model, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.batcher = batcher = Batcher(model, max_batch=config.max_batch,
                                          max_wait_ms=config.max_wait_ms, metrics=metrics)
        batcher.start()
        warming = asyncio.create_task(_warm(batcher))
        try:
            yield
        finally:
            state.ready, state.not_ready = False, "shutting down"
            metrics.ready.set(0)
            await batcher.close()  # runs what is queued first
            if not warming.done():
                warming.cancel()

    async def _warm(batcher: Batcher) -> None:
        try:
            if config.warmup:
                await batcher.call(lambda: model.warmup(1))
                if config.max_batch > 1:  # large batches allocate their own buffers
                    await batcher.call(lambda: model.warmup(config.max_batch))
        except Exception as e:
            state.not_ready = f"warmup failed: {e}"
            log.error("the model failed to warm up, /readyz stays 503: %s", e)
            return
        state.ready = True
        metrics.ready.set(1)
        log.info("model warm: %s on %s, %d exits", model.backend.name, model.backend.device,
                 num_exits)

    app = FastAPI(
        title="byot-edge", version=__version__, lifespan=lifespan,
        description="An anytime classifier: each request is answered by the shallowest "
                    "exit of a self-distilled multi-exit network that is confident enough, "
                    "or by the deepest exit that fits a latency budget. Requests that arrive "
                    "together run as one batch.")
    app.add_middleware(_Observe, metrics=metrics)
    protect = [Depends(_auth(config.token))] if config.token else []
    auth_errors = AUTH_ERROR if config.token else {}

    @app.exception_handler(ByotError)
    async def byot_error(request: Request, exc: ByotError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: a JSON 500 (the traceback goes to the log).
        return JSONResponse({"detail": "internal server error; see the server's log"},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "; ".join(_describe(e) for e in exc.errors())},
                            status_code=422)

    @app.post("/v1/predict", response_model=PredictResponse, tags=["predict"],
              dependencies=protect, responses={**ERRORS, **auth_errors},
              openapi_extra={"requestBody": REQUEST_BODY})
    async def predict(
        request: Request,
        threshold: Annotated[list[Threshold] | None, Query(
            description="Confidence threshold in (0, 1] for the cascade: one for every "
                        f"shallow exit, or {num_exits - 1} (repeat the parameter), one per "
                        "exit. Default: the manifest's calibrated thresholds.")] = None,
        budget_ms: Annotated[float | None, Query(
            gt=0, allow_inf_nan=False,
            description="Latency budget: alone, the deepest exit whose profiled latency "
                        "fits; with threshold, a cascade that stops before overrunning it. "
                        "Counts model time, not the queue.")] = None,
        exit_: Annotated[int | None, Query(
            alias="exit", ge=1, le=num_exits,
            description=f"Answer from this exit (1..{num_exits}); not with threshold or "
                        "budget_ms.")] = None,
        top_k: Annotated[int | None, Query(
            ge=1, le=num_classes, description="How many classes to list per sample "
                                              f"(default {config.default_top_k}).")] = None,
        criterion: Annotated[Literal["max_softmax", "entropy", "margin"] | None, Query(
            description="Confidence criterion (default: the calibrated one).")] = None,
        stat: Annotated[Literal["p50", "p90", "p99", "mean"], Query(
            description="Profiled latency statistic a budget is compared with.")] = "p50",
    ) -> PredictResponse:
        """Classify an image or a tensor; options go in the query string."""
        t0 = time.perf_counter()
        unknown = sorted(set(request.query_params) - set(QUERY_OPTIONS))
        if unknown:
            raise _problem(422, f"unknown query parameter(s) {unknown}; known: "
                                f"{', '.join(QUERY_OPTIONS)}")
        options = PredictOptions(
            None if threshold is None else threshold[0] if len(threshold) == 1
            else tuple(threshold), budget_ms, exit_, criterion, stat)
        options.validate(num_exits)
        if exit_ is None:
            model.threshold_policy(options.threshold, options.criterion)  # raises if invalid
        batcher = state.batcher
        if batcher is None or not state.ready or not batcher.alive:
            metrics.rejected.labels(reason="not_ready").inc()
            reason = state.not_ready if batcher is None or batcher.alive else "worker stopped"
            raise _problem(503, f"the model is not ready ({reason}); retry shortly", 1)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = media == "multipart/form-data"
        if not (multipart or media.startswith("image/") or media == "application/json"
                or media in NPY_TYPES):
            raise _problem(415, f"unsupported content type {media or '(none)'!r}; send "
                                "multipart/form-data (a `file` part), image/png, image/jpeg, "
                                "application/json or application/x-npy")
        with batcher.receiving():  # the batch being formed may wait for this one
            # A client still sending holds no queue slot: slow or stalled uploads (408 after
            # body_timeout_s) cannot fill the queue and turn the others away.
            metrics.receiving.inc()
            try:
                body = await _read_body(request, config.max_upload_bytes, config.body_timeout_s)
            finally:
                metrics.receiving.dec()
            if state.admitted >= config.max_queue:
                metrics.rejected.labels(reason="queue_full").inc()
                raise _problem(503, f"the server is busy ({state.admitted} requests queued, "
                                    f"the limit is {config.max_queue}); retry after a moment",
                               batcher.expected_wait_s())
            state.admitted += 1
            metrics.in_flight.inc()
            try:
                x = await _decode(request, media, body)
            except BaseException:
                state.admitted -= 1
                metrics.in_flight.dec()
                raise
        try:
            answer = await _submit(batcher, x, options)
        finally:
            state.admitted -= 1
            metrics.in_flight.dec()
        return _response(answer, top_k or min(config.default_top_k, num_classes), t0)

    async def _decode(request: Request, media: str, body: bytes) -> np.ndarray:
        parts = (await _form_parts(request, body, config.max_batch)
                 if media == "multipart/form-data" else None)
        args = (media, body, parts, spec, config.max_image_pixels, config.max_request_pixels)
        if media in NPY_TYPES and len(body) <= INLINE_NPY_BYTES:
            x = decode_inputs(*args)  # a copy: cheaper than a hop to a thread and back
        else:  # parsing JSON and decoding images take long enough to stall the loop
            x = await run_in_threadpool(decode_inputs, *args)
        if len(x) > config.max_batch:
            raise _problem(413, f"the request holds {len(x)} samples; the server takes at "
                                f"most {config.max_batch} per request (--max-batch)")
        return x

    async def _submit(batcher: Batcher, x: np.ndarray, options: PredictOptions) -> Answer:
        try:
            return await batcher.submit(x, options)
        except BatcherClosed as e:
            raise _problem(503, f"{e}; retry on another replica or in a moment", 1) from None
        except ByotError:
            raise
        except Exception:  # the backend failed (a bug, a device error): log it, answer 500
            log.exception("the model failed on a batch")
            raise _problem(500, "the model failed on this request's batch; see the server's "
                                "log") from None

    def label(i: int) -> str:
        names = model.class_names
        return names[i] if 0 <= i < len(names) else str(i)

    def _response(answer: Answer, k: int, t0: float) -> PredictResponse:
        r = answer.result
        preds = []
        for i in range(len(r.indices)):
            if answer.probabilities is not None:
                p = answer.probabilities[i]
                top = [TopClass(index=int(j), label=label(int(j)), probability=float(p[j]))
                       for j in np.argsort(-p, kind="stable")[:k]]
            else:  # the runner-ups are unknown: the answer alone
                top = [TopClass(index=int(r.indices[i]), label=label(int(r.indices[i])),
                                probability=float(r.confidences[i]))]
            preds.append(PredictionOut(index=int(r.indices[i]), label=label(int(r.indices[i])),
                                       confidence=float(r.confidences[i]),
                                       exit=int(r.exits[i]), top_k=top,
                                       model_ms=float(r.latency_ms[i])))
        return PredictResponse(predictions=preds, mode=r.mode,
                               latency_ms=(time.perf_counter() - t0) * 1e3,
                               queue_ms=answer.queue_ms, batch_size=answer.batch_size,
                               warnings=list(r.warnings))

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"], dependencies=protect,
             responses=auth_errors)
    async def describe() -> ModelInfo:
        """The model: exits with FLOPs, accuracy and thresholds, input spec, latency
        profiles, and how it is served."""
        return info

    @app.get("/healthz", response_model=Status, tags=["health"])
    async def healthz() -> Status:
        """Liveness: 200 while the server's event loop answers."""
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, tags=["health"],
             responses={503: {"model": Status, "description": "Not ready (yet)."}})
    async def readyz() -> Any:
        """Readiness: 200 once the model is warm, 503 before, after a failed warmup and
        while shutting down."""
        alive = state.batcher is not None and state.batcher.alive
        if state.ready and alive:
            return Status(status="ready")
        reason = state.not_ready if state.batcher is None or alive else "worker stopped"
        return JSONResponse({"status": reason}, status_code=503)

    @app.get("/metrics", tags=["health"], dependencies=protect, responses=auth_errors,
             response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics: requests by status, exits taken, latency histograms, batch
        sizes, queue depth."""
        return Response(metrics.render(), media_type=metrics.content_type)

    from byot_edge.runtime.oip import oip_router  # /v2: the Open Inference Protocol

    app.include_router(oip_router(
        model, lambda x, o: _submit(state.batcher, x, o),  # type: ignore[arg-type]
        lambda: state.ready and bool(state.batcher and state.batcher.alive), dependencies=protect))
    return app


def serve(model: AnytimeModel, config: ServeConfig, *, host: str = "127.0.0.1",
          port: int = 8080, log_level: str = "info") -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM, which finish the requests in flight
    (up to config.shutdown_timeout_s) before returning."""
    try:
        import uvicorn
    except ImportError:
        raise missing_dependency("uvicorn", "serve", "to serve models") from None
    server = uvicorn.Server(uvicorn.Config(
        create_app(model, config), host=host, port=port, log_level=log_level,
        lifespan="on", timeout_graceful_shutdown=config.shutdown_timeout_s))
    # uvicorn re-raises the signal it stopped on once it is done; with these handlers in
    # place that is a no-op, so a graceful stop returns normally (exit code 0).
    stopped: list[int] = []
    previous = ({sig: signal.signal(sig, lambda s, _f: stopped.append(s))
                 for sig in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise ByotError(f"the server did not start on {host}:{port}; see the log above")
