"""The routes, as routers built over a ServerContext: /v1/predict, and /v1/model with the
health and metrics endpoints. Another router (another wire format) is built the same way
and handed to create_app (see byot_edge.runtime.server)."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, which
# name local variables (bounds, dependencies), at run time.

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from byot_edge.errors import RequestError
from byot_edge.runtime.decode import (
    MULTIPART_TYPE,
    decode_body,
    decode_bytes,
    decodes_inline,
    max_body,
    media_type,
)
from byot_edge.runtime.server.budget import BodyHold
from byot_edge.runtime.server.context import ServerContext
from byot_edge.runtime.server.deadlines import HEADER, parse_deadline_ms, tightest
from byot_edge.runtime.server.encode import predict_document, to_json
from byot_edge.runtime.server.http import form_parts, read_body
from byot_edge.runtime.server.schemas import (
    AUTH_ERROR,
    ERRORS,
    REQUEST_BODY,
    ModelInfo,
    PredictResponse,
    Status,
    Threshold,
    model_info,
)

QUERY_OPTIONS = ("threshold", "budget_ms", "exit", "top_k", "criterion", "stat", "deadline_ms")


def predict_router(ctx: ServerContext) -> APIRouter:
    """POST /v1/predict: images or tensors in the body, options in the query string."""
    config, model = ctx.config, ctx.model
    num_exits, num_classes = model.num_exits, len(model.class_names)
    spec, limits = model.manifest.input, config.limits
    class_names = list(model.class_names)
    router = APIRouter(dependencies=ctx.protect, tags=["predict"])

    @router.post("/v1/predict", response_model=PredictResponse,
                 responses={**ERRORS, **(AUTH_ERROR if ctx.protect else {})},
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
        # Text, checked here: a bad deadline is a 400 that says what a deadline is.
        deadline_ms: Annotated[str | None, Query(
            description="Milliseconds, from when the server has the body, by which the "
                        "answer must be ready: the cascade stops in time, and a request "
                        "that cannot make it is answered 504 at once. Also the "
                        "X-Deadline-Ms header (the tighter holds).")] = None,
    ) -> PredictResponse:
        """Classify an image or a tensor; options go in the query string."""
        t0 = time.perf_counter()
        unknown = sorted(set(request.query_params) - set(QUERY_OPTIONS))
        if unknown:
            raise RequestError(422, f"unknown query parameter(s) {unknown}; known: "
                                    f"{', '.join(QUERY_OPTIONS)}")
        options = ctx.options(threshold, budget_ms, exit_, criterion, stat)
        deadline = tightest(parse_deadline_ms(deadline_ms, "deadline_ms"),
                            parse_deadline_ms(request.headers.get(HEADER), "X-Deadline-Ms"))
        media = media_type(request.headers.get("content-type", ""))

        limit, too_big = max_body(media, spec, limits, config.max_upload_bytes)

        async def read(hold: BodyHold) -> bytes:
            body = await read_body(request, limit, config.body_timeout_s, hold, too_big)
            hold.reserve(len(body) + decode_bytes(media, body, spec, limits))  # 503 if spent
            return body

        async def decode(body: bytes) -> Any:
            parts = (await form_parts(request, body, config.max_batch)
                     if media == MULTIPART_TYPE else None)
            if decodes_inline(media, len(body)):
                return decode_body(media, body, parts, spec, limits)
            # parsing JSON and decoding images take long enough to stall the loop
            return await run_in_threadpool(decode_body, media, body, parts, spec, limits)

        answer = await ctx.predict(options, read, decode, deadline)
        k = top_k or min(config.default_top_k, num_classes)
        # The bytes directly (PredictResponse documents them): FastAPI would validate and
        # serialise a model per sample and per class again.
        return Response(to_json(predict_document(answer, class_names, k, t0)),  # type: ignore[return-value]
                        media_type="application/json")

    return router


def info_router(ctx: ServerContext) -> APIRouter:
    """GET /v1/model, /healthz, /readyz and /metrics."""
    router = APIRouter()
    auth_errors = AUTH_ERROR if ctx.protect else {}

    @router.get("/v1/model", response_model=ModelInfo, tags=["model"],
                dependencies=ctx.protect, responses=auth_errors)
    async def describe() -> ModelInfo:
        """The model: exits with FLOPs, accuracy and thresholds, input spec, latency
        profiles, and how it is served."""
        return model_info(ctx.model, ctx.config)

    @router.get("/healthz", response_model=Status, tags=["health"])
    async def healthz() -> Status:
        """Liveness: 200 while the server's event loop answers."""
        return Status(status="ok")

    @router.get("/readyz", response_model=Status, tags=["health"],
                responses={503: {"model": Status, "description": "Not ready (yet)."}})
    async def readyz() -> Any:
        """Readiness: 200 once the model is warm, 503 before, after a failed warmup and
        while shutting down."""
        reason = ctx.not_ready_reason()
        if reason is None:
            return Status(status="ready")
        return JSONResponse({"status": reason}, status_code=503)

    @router.get("/metrics", tags=["health"], dependencies=ctx.protect, responses=auth_errors,
                response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics: requests by status, exits taken, latency histograms, batch
        sizes, queue depth."""
        return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)

    return router
