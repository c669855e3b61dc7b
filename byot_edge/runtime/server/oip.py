"""The Open Inference Protocol v2 (KServe v2, what Triton speaks) as a FastAPI router.

    GET  /v2                             server name, version, extensions
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}               inputs and outputs
    GET  /v2/models/{name}/ready
    POST /v2/models/{name}/infer         JSON tensors, or the binary tensor data extension

The model name (`byot` unless told otherwise), the input, the request parameters and the
outputs are those of the Triton cascade model `byot-edge triton-repo` writes
(byot_edge.triton.protocol), so one client, unchanged, talks to either server.

The routes run on the server's context (`ServerContext`) like /v1/predict: the same token,
readiness, queue bound, body limits and batcher; only the wire format differs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from byot_edge import __version__
from byot_edge.errors import ByotError, RequestError
from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.preprocess import check_batch
from byot_edge.runtime.server.context import ServerContext
from byot_edge.runtime.server.http import read_body
from byot_edge.triton.config import DATATYPES, WIRE_DATATYPES
from byot_edge.triton.protocol import (
    INPUT,
    OUTPUTS,
    answer_tensors,
    parse_parameters,
)

HEADER_LENGTH = "inference-header-content-length"
# Parameters the protocol's clients set for the transport (tritonclient sets
# binary_data_output); they are not the model's.
TRANSPORT_PARAMETERS = ("binary_data_output", "binary_data", "binary_data_size", "headers",
                        "priority", "timeout", "sequence_id", "sequence_start", "sequence_end")
NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64,
         "INT32": np.int32, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


class ProtocolError(ByotError):
    """A request the protocol cannot parse: a 400 with the message."""


def _input_tensor(doc: dict[str, Any], binary: bytes, model: AnytimeModel) -> np.ndarray:
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"expected one input tensor named {INPUT!r}")
    t = inputs[0]
    if t.get("name") != INPUT:
        raise ProtocolError(f"unknown input {t.get('name')!r}; this model takes {INPUT!r}")
    want = WIRE_DATATYPES[DATATYPES[model.manifest.input.dtype]]
    if t.get("datatype") != want:
        raise ProtocolError(f"input {INPUT!r} has datatype {t.get('datatype')!r}; the model "
                            f"expects {want}")
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"input {INPUT!r} needs a shape of non-negative integers, got {shape}")
    dtype = np.dtype(NUMPY[want])
    size = (t.get("parameters") or {}).get("binary_data_size")
    try:
        if size is not None:
            if size != int(np.prod(shape)) * dtype.itemsize or size > len(binary):
                raise ProtocolError(f"input {INPUT!r}: binary_data_size {size} does not match "
                                    f"shape {shape} of {want} (or the body is shorter)")
            x = np.frombuffer(binary[:size], dtype).reshape(shape)
        else:
            x = np.asarray(t.get("data"), dtype=dtype).reshape(shape)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"input {INPUT!r}: data does not fit shape {shape} of {want} "
                            f"({e})") from None
    return check_batch(x, model.manifest.input)


def _output_choice(doc: dict[str, Any], produced: Sequence[str]) -> list[tuple[str, bool]]:
    """(name, binary?) of each output to send, in the order asked for."""
    default_binary = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    asked = doc.get("outputs")
    if not asked:
        return [(name, default_binary) for name in produced]
    out = []
    for o in asked:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in produced:
            raise ProtocolError(f"output {name!r} is not produced for this request; outputs: "
                                f"{', '.join(produced)} (top_k outputs need top_k > 0)")
        out.append((name, bool((o.get("parameters") or {}).get("binary_data",
                                                                 default_binary))))
    return out


def encode_response(name: str, doc: dict[str, Any],
                    tensors: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body, JSON then the binary outputs, and its headers."""
    wire = {n: w for n, w, _, _ in OUTPUTS}
    outputs, blobs = [], []
    for out_name, binary in _output_choice(doc, list(tensors)):
        a = tensors[out_name]
        entry: dict[str, Any] = {"name": out_name, "datatype": wire[out_name],
                                 "shape": list(a.shape)}
        if binary:
            blob = np.ascontiguousarray(a).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = a.ravel().tolist()
        outputs.append(entry)
    header = json.dumps({"model_name": name, "model_version": "1", "id": doc.get("id", ""),
                         "outputs": outputs}).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      HEADER_LENGTH: str(len(header))}


def decode_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(the JSON request, the binary data after it)."""
    try:
        n = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise ProtocolError(f"Inference-Header-Content-Length must be a number of bytes, got "
                            f"{header_length!r}") from None
    if not 0 < n <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {n} does not fit a body of "
                            f"{len(body)} bytes")
    try:
        doc = json.loads(body[:n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the request is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the request must be a JSON object with 'inputs'")
    return doc, body[n:]


def model_metadata(model: AnytimeModel, name: str) -> dict[str, Any]:
    spec = model.manifest.input
    return {
        "name": name, "versions": ["1"], "platform": "byot-edge",
        "inputs": [{"name": INPUT, "datatype": WIRE_DATATYPES[DATATYPES[spec.dtype]],
                    "shape": [-1, *spec.shape]}],
        "outputs": [{"name": n, "datatype": w, "shape": [-1, *dims]}
                    for n, w, _, dims in OUTPUTS],
    }


def oip_router(ctx: ServerContext) -> APIRouter:
    """The /v2 routes for the served model (named by the config's model_name), on the
    server's context: the same bearer token, admission (queue bound, 503 with Retry-After),
    body limits and batcher as /v1/predict."""
    router = APIRouter(tags=["open inference protocol v2"])
    model, config, guarded = ctx.model, ctx.config, list(ctx.protect)
    name = config.model_name

    def error(status: int, message: str, retry_after: float | None = None) -> JSONResponse:
        headers = (None if retry_after is None
                   else {"Retry-After": str(max(1, math.ceil(retry_after)))})
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def known(model_name: str) -> JSONResponse | None:
        if model_name != name:
            return error(404, f"unknown model {model_name!r}; this server serves {name!r}")
        return None

    def ready() -> bool:
        return ctx.not_ready_reason() is None

    @router.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "byot-edge", "version": __version__,
                "extensions": ["binary_tensor_data", "parameters"]}

    @router.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @router.get("/v2/health/ready")
    async def server_ready() -> Response:
        return Response(status_code=200 if ready() else 503)

    @router.get("/v2/models/{model_name}", dependencies=guarded)
    @router.get("/v2/models/{model_name}/versions/{version}", dependencies=guarded)
    async def metadata(model_name: str, version: str = "1") -> Any:
        return known(model_name) or model_metadata(model, name)

    @router.get("/v2/models/{model_name}/ready", dependencies=guarded)
    @router.get("/v2/models/{model_name}/versions/{version}/ready", dependencies=guarded)
    async def model_ready(model_name: str, version: str = "1") -> Response:
        return known(model_name) or Response(status_code=200 if ready() else 503)

    @router.post("/v2/models/{model_name}/infer", dependencies=guarded)
    @router.post("/v2/models/{model_name}/versions/{version}/infer", dependencies=guarded)
    async def infer(model_name: str, request: Request, version: str = "1") -> Response:
        if (missing := known(model_name)) is not None:
            return missing
        try:
            # The options are in the body, so it is read first; then the request takes the
            # same path as /v1/predict (readiness, a queue slot, the batcher).
            body = await read_body(request, config.max_upload_bytes, config.body_timeout_s)
            doc, binary = decode_request(body, request.headers.get(HEADER_LENGTH))
            params = {k: v for k, v in (doc.get("parameters") or {}).items()
                      if k not in TRANSPORT_PARAMETERS}
            parsed = parse_parameters(params, model.num_exits, len(model.class_names))
            options = parsed.options

            async def read() -> bytes:
                return body

            async def decode(_: bytes) -> np.ndarray:
                return _input_tensor(doc, binary, model)

            answer = await ctx.predict(options, read, decode)
            tensors = answer_tensors(answer.result, parsed.top_k,
                                     probabilities=answer.probabilities)
            content, headers = encode_response(name, doc, tensors)
        except RequestError as e:  # the server's own refusals (busy, too big, not ready)
            return error(e.status, e.detail, e.retry_after)
        except ByotError as e:
            return error(400, str(e))
        return Response(content, headers=headers)

    return router
