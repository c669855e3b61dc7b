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
from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from byot_edge import __version__
from byot_edge.errors import ByotError, RequestError
from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.decode import JSON_VALUE_BYTES, check_json_values, json_values
from byot_edge.runtime.preprocess import check_batch
from byot_edge.runtime.server.budget import BodyHold
from byot_edge.runtime.server.context import ServerContext
from byot_edge.runtime.server.deadlines import HEADER as DEADLINE_HEADER
from byot_edge.runtime.server.deadlines import parse_deadline_ms, tightest
from byot_edge.runtime.server.http import read_body
from byot_edge.triton.config import DATATYPES, WIRE_DATATYPES
from byot_edge.triton.protocol import (
    INPUT,
    OUTPUTS,
    Request,
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


# A JSON request header may hold this many values besides its input's data (parameters,
# outputs, shape): what bounds the cost of parsing it (decode.check_json_values).
HEADER_VALUES = 1024
# A request header up to this size parses faster than a hop to a thread and back.
INLINE_HEADER_BYTES = 2**16


class ProtocolError(ByotError):
    """A request the protocol cannot parse: a 400 with the message."""


def _object(value: Any, where: str) -> dict[str, Any]:
    """A JSON object the protocol allows to be absent ({} then), else a 400."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a JSON object, e.g. {{\"exit\": 1}}, got "
                            f"{json.dumps(value)[:80]}")
    return value


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
    size = _object(t.get("parameters"), f"input {INPUT!r}'s parameters").get("binary_data_size")
    try:
        if size is not None:
            if (not isinstance(size, int) or size != math.prod(shape) * dtype.itemsize
                    or size > len(binary)):
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
    default_binary = bool(_object(doc.get("parameters"), "the request's parameters")
                          .get("binary_data_output", False))
    asked = doc.get("outputs")
    if not asked:
        return [(name, default_binary) for name in produced]
    if not isinstance(asked, list):
        raise ProtocolError('"outputs" must be a list of {"name": ...} objects, e.g. '
                            '[{"name": "class_index"}]')
    out = []
    for o in asked:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in produced:
            raise ProtocolError(f"output {name!r} is not produced for this request; outputs: "
                                f"{', '.join(produced)} (top_k outputs need top_k > 0)")
        params = _object(o.get("parameters"), f"output {name!r}'s parameters")
        out.append((name, bool(params.get("binary_data", default_binary))))
    return out


def encode_response(name: str, doc: dict[str, Any], tensors: dict[str, np.ndarray],
                    parameters: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body, JSON then the binary outputs, and its headers; `parameters`:
    the response's own (the deadline's), if any."""
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
    response: dict[str, Any] = {"model_name": name, "model_version": "1",
                                "id": doc.get("id", "")}
    if parameters:
        response["parameters"] = parameters
    header = json.dumps({**response, "outputs": outputs}).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      HEADER_LENGTH: str(len(header))}


def _json_part(body: bytes, header_length: str | None) -> bytes:
    """The JSON of a request, leniently (decode_request checks the length)."""
    n = int(header_length) if header_length is not None and header_length.isdigit() else 0
    return body[:n] if 0 < n < len(body) else body


def decode_request(body: bytes, header_length: str | None,
                   max_values: int | None = None) -> tuple[dict[str, Any], bytes]:
    """(the JSON request, the binary data after it); 413 when its JSON holds more than
    `max_values` values (None: no bound)."""
    try:
        n = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise ProtocolError(f"Inference-Header-Content-Length must be a number of bytes, got "
                            f"{header_length!r}") from None
    if not 0 < n <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {n} does not fit a body of "
                            f"{len(body)} bytes")
    if max_values is not None:
        check_json_values(body[:n], max_values, "the request's JSON")
    try:
        doc = json.loads(body[:n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the request is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the request must be a JSON object with 'inputs'")
    return doc, body[n:]


def parse_infer(body: bytes, header_length: str | None, model: AnytimeModel,
                max_values: int) -> tuple[np.ndarray, Request, dict[str, Any], float | None]:
    """An infer request's checked batch, its parameters, what of its JSON document the
    answer needs (id, outputs, parameters: not the input's data), and its deadline_ms
    parameter (the server's, not the Triton model's). Its JSON may hold `max_values`
    values (413 past that)."""
    doc, binary = decode_request(body, header_length, max_values)
    params = {k: v for k, v in _object(doc.get("parameters"), "the request's parameters")
              .items() if k not in TRANSPORT_PARAMETERS}
    deadline = parse_deadline_ms(params.pop("deadline_ms", None), "parameter deadline_ms")
    parsed = parse_parameters(params, model.num_exits, len(model.class_names))
    # Outputs named that this request will not produce are refused before it runs.
    _output_choice(doc, [n for n, *_ in OUTPUTS if parsed.top_k or not n.startswith("top_k")])
    x = _input_tensor(doc, binary, model)
    return x, parsed, {k: doc[k] for k in ("id", "outputs", "parameters") if k in doc}, deadline


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
    # What a request's JSON may hold: a full batch's data and the rest of the document.
    max_values = config.max_batch * math.prod(model.manifest.input.shape) + HEADER_VALUES

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
    async def infer(model_name: str, request: HTTPRequest, version: str = "1") -> Response:
        if (missing := known(model_name)) is not None:
            return missing
        header_length = request.headers.get(HEADER_LENGTH)
        # by decode: parameters, doc, the deadline parameter
        decoded: list[tuple[Request, dict[str, Any], float | None]] = []

        async def read(hold: BodyHold) -> bytes:
            body = await read_body(request, config.max_upload_bytes, config.body_timeout_s,
                                   hold)
            # what parsing its JSON will allocate too (503 if the budget is spent)
            values = min(json_values(_json_part(body, header_length)), max_values)
            hold.reserve(len(body) + JSON_VALUE_BYTES * values)
            return body

        async def decode(body: bytes) -> np.ndarray:
            # The options are in the body: parsed with the tensor, once the body is in
            # and the request holds a queue slot, as /v1/predict decodes.
            if len(body) <= INLINE_HEADER_BYTES:
                x, parsed, doc, deadline = parse_infer(body, header_length, model, max_values)
            else:  # parsing a large JSON document would stall the loop
                x, parsed, doc, deadline = await run_in_threadpool(
                    parse_infer, body, header_length, model, max_values)
            decoded.append((parsed, doc, deadline))
            return x

        try:
            header = parse_deadline_ms(request.headers.get(DEADLINE_HEADER), "X-Deadline-Ms")
            answer = await ctx.predict(lambda: decoded[0][0].options, read, decode,
                                       lambda: tightest(decoded[0][2], header))
            parsed, doc, _ = decoded[0]
            tensors = answer_tensors(answer.result, parsed.top_k,
                                     probabilities=answer.probabilities)
            deadline = (None if answer.deadline_ms is None else
                        {"deadline_ms": answer.deadline_ms,
                         "deadline_left_ms": answer.deadline_left_now_ms()})
            content, headers = encode_response(name, doc, tensors, deadline)
        except RequestError as e:  # the server's own refusals (busy, too big, not ready)
            return error(e.status, e.detail, e.retry_after)
        except ByotError as e:
            return error(400, str(e))
        return Response(content, headers=headers)

    return router
