"""What the HTTP API answers, as pydantic models: they are its OpenAPI documentation
(/docs), with the error responses and the request body each route declares. The answers
themselves are written as bytes by `encode` (no model is built per request)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.server.config import ServeConfig


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
    deadline_ms: float | None = Field(
        None, description="The deadline this request was held to (its own, or the server's "
                          "--slo-ms), counted from when its body was in; null: none.")
    deadline_left_ms: float | None = Field(
        None, description="How much of the deadline was left as the response was made "
                          "(negative: late); null without a deadline.")


class ExitSummary(BaseModel):
    """One exit as the manifest describes it (models' ExitInfo is the network's own)."""

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
    device: str = Field(description="What the backend runs on now (ONNX Runtime can fall "
                                    "back to the CPU when it creates its sessions).")
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
    exits: list[ExitSummary]
    thresholds: ThresholdsInfo | None
    latency_profiles: list[LatencyProfileInfo]
    serving: ServingInfo


class Status(BaseModel):
    status: str


def model_info(model: AnytimeModel, config: ServeConfig) -> ModelInfo:
    """Built when asked: the backend's device is only known once its sessions exist."""
    m = model.manifest
    th = m.thresholds
    return ModelInfo(
        arch=str(m.model.get("arch", "")), dataset=m.dataset, num_exits=m.num_exits,
        num_classes=len(m.class_names), class_names=list(m.class_names),
        input=InputInfo(shape=list(m.input.shape), dtype=m.input.dtype, layout=m.input.layout,
                        mean=list(m.input.mean), std=list(m.input.std)),
        exits=[ExitSummary(index=e.index, stage=e.stage, flops=e.flops, params=e.params,
                           val_accuracy=e.val_accuracy,
                           threshold=th.values[e.index - 1] if th and e.index < m.num_exits
                           else None,
                           files=sorted(e.files)) for e in m.exits],
        thresholds=ThresholdsInfo(criterion=th.criterion, values=th.values,
                                  temperatures=th.temperatures, source=th.source,
                                  expected=th.expected) if th else None,
        latency_profiles=[LatencyProfileInfo(backend=p.backend, device=p.device, batch=p.batch,
                                             exits=p.to_dict()["exits"], created=p.created)
                          for p in m.latency_profiles],
        serving=ServingInfo(backend=model.backend.name, device=model.backend.device,
                            max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                            max_queue=config.max_queue, max_upload_mb=config.max_upload_mb,
                            auth=config.token is not None),
    )


# -- what the routes declare in the OpenAPI schema ----------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body cannot be parsed (bad JSON, .npy "
                                                 "or multipart), or a deadline is not a "
                                                 "number of milliseconds."},
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
    504: {"model": ErrorResponse, "description": "The request's deadline (deadline_ms, "
                                                 "X-Deadline-Ms or the server's --slo-ms) "
                                                 "cannot be met, not even by the first exit; "
                                                 "answered at once, without running."},
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
