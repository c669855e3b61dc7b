"""Schema-driven fuzzing: requests built from the served OpenAPI schema (its parameters,
their types and bounds, its body content types), pushed past every bound, with malformed
bodies of every declared kind. No 5xx, always a well-formed answer, and the server still
answers afterwards."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from server_fixtures import Deployed, client, deployed_model, in_thread, wait_until

from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.server import PredictResponse, ServeConfig, create_app

SHAPE = (3, 32, 32)  # the test model's input
EXTRA_TYPES = ["text/plain", "", "application/x-www-form-urlencoded", "image/gif",
               "application/octet-stream", "multipart/form-data; boundary=nothing"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, dict]]:
    deployed: Deployed = deployed_model(tmp_path_factory)
    model = AnytimeModel.load(deployed.manifest, threads=1)
    config = ServeConfig(max_batch=8, max_upload_mb=0.25, warmup=False, max_wait_ms=0)
    with in_thread(create_app(model, config)) as url, client(url) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 30, "/readyz")
        yield c, c.get("/openapi.json").json()
    model.close()


# -- values from a parameter's JSON schema, inside and outside its bounds ---------------------


def from_schema(schema: dict[str, Any], valid: bool) -> st.SearchStrategy[Any]:
    """Values a parameter's schema allows (valid) or anything near and far from them."""
    if "anyOf" in schema:
        return st.one_of([from_schema(s, valid) for s in schema["anyOf"]])
    kind = schema.get("type")
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | (st.nothing() if valid else st.text(max_size=12))
    if kind == "integer":
        lo, hi = schema.get("minimum", -10), schema.get("maximum", 10)
        return st.integers(lo, hi) if valid else st.integers(lo - 2, hi + 2) | st.integers()
    if kind == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -1.0))
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 1e6))
        inside = st.floats(lo, hi, exclude_min="exclusiveMinimum" in schema,
                           exclude_max="exclusiveMaximum" in schema)
        if valid:
            return inside
        return (inside | st.sampled_from([lo, hi, 0.0, -0.0, 1e-300, 1e300])
                | st.floats(allow_nan=True, allow_infinity=True))
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), valid), min_size=1, max_size=5)
    if kind == "null":
        return st.none()
    return st.text(max_size=12) | st.floats() | st.integers()


def query(op: dict[str, Any]) -> st.SearchStrategy[list[tuple[str, str]]]:
    """Query pairs from the operation's parameters: mostly values the schema allows (so
    the body gets looked at), else out-of-bound values and unknown parameters."""
    def pairs(name: str, value: Any) -> list[tuple[str, str]]:
        values = value if isinstance(value, list) else [value]
        return [(name, str(v)) for v in values if v is not None]

    def params(valid: bool) -> st.SearchStrategy[list[tuple[str, str]]]:
        each = [st.none() | from_schema(p["schema"], valid).map(
            lambda v, n=p["name"]: pairs(n, v)) for p in op.get("parameters", [])]
        junk = (st.just([]) if valid else
                st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=8)),
                         max_size=2))
        return st.tuples(st.tuples(*each), junk).map(
            lambda t: [kv for ps in t[0] if ps for kv in ps] + t[1])

    return st.just([]) | params(True) | params(False)


# -- bodies ------------------------------------------------------------------------------------


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


shapes = st.sampled_from([SHAPE, (1, *SHAPE), (2, *SHAPE), (9, *SHAPE), (0, *SHAPE), (1, 32, 32, 3),
                          (3, 16, 16), (1, 3), (), (2, 1, 32, 32)])
dtypes = st.sampled_from(["<f4", ">f4", "<f8", "<f2", "u1", "<i8", "?", "<c8"])


def array_of(dtype: str, shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    width = {"f2": 16, "f4": 32, "f8": 64}.get(dtype[-2:])
    if width is None:
        return hnp.arrays(dtype, shape)
    return hnp.arrays(dtype, shape, fill=st.just(0.5),
                      elements=st.floats(allow_nan=True, allow_infinity=True, width=width))


arrays = st.tuples(dtypes, shapes).flatmap(lambda ds: array_of(*ds))


@st.composite
def images(draw: st.DrawFn) -> bytes:
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16", "CMYK"]))
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF"]))
    img = Image.new(mode, size, color=draw(st.integers(0, 255)))
    buf = io.BytesIO()
    try:
        img.save(buf, fmt)
    except (OSError, ValueError, KeyError):  # a mode the format cannot hold
        img.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def corrupt(data: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Truncated, or with a few bytes overwritten."""
    @st.composite
    def go(draw: st.DrawFn) -> bytes:
        b = bytearray(draw(data))
        if draw(st.booleans()):
            return bytes(b[:draw(st.integers(0, len(b)))])
        for _ in range(draw(st.integers(1, 4))):
            if b:
                b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        return bytes(b)

    return go()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3), max_leaves=12)


@st.composite
def crafted_npy(draw: st.DrawFn) -> bytes:
    """A .npy file whose header claims any shape (negative dimensions too), with as many
    bytes of data as the product of that shape says, in absolute value."""
    shape = tuple(draw(st.lists(st.integers(-40, 40), min_size=1, max_size=4)))
    header = {"descr": "<f4", "fortran_order": draw(st.booleans()), "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    values = abs(int(np.prod(shape))) if all(shape) else 0
    return buf.getvalue() + b"\0" * (4 * min(values, 100_000))


def json_tensor(a: np.ndarray) -> bytes:
    return json.dumps({"tensor": a.tolist()}).encode()  # NaN/Infinity as Python writes them


BODIES: dict[str, st.SearchStrategy[bytes]] = {
    "application/json": st.one_of(
        arrays.filter(lambda a: a.dtype.kind in "fiub").map(json_tensor),
        json_values.map(lambda v: json.dumps(v).encode()),
        json_values.map(lambda v: json.dumps({"tensor": v}).encode()),
        corrupt(arrays.filter(lambda a: a.dtype.kind == "f").map(json_tensor)),
        st.binary(max_size=64)),
    "application/x-npy": st.one_of(arrays.map(npy_bytes), corrupt(arrays.map(npy_bytes)),
                                   crafted_npy(), st.binary(max_size=64)),
    "image/png": st.one_of(images(), corrupt(images()), st.binary(max_size=64)),
    "image/jpeg": st.one_of(images(), corrupt(images()), st.binary(max_size=64)),
}
ANY_BODY = st.one_of(*BODIES.values())


@st.composite
def multipart_parts(draw: st.DrawFn) -> list[tuple[str, tuple[str, bytes]]]:
    names = st.sampled_from(["file", "file", "file", "image", "threshold"])
    return draw(st.lists(st.tuples(names, st.tuples(st.text(max_size=8), ANY_BODY)),
                         max_size=3))


def _asked_for_a_deadline(r: httpx.Response) -> bool:
    return "deadline_ms" in r.request.url.params or "x-deadline-ms" in r.request.headers


def well_formed(r: httpx.Response) -> None:
    # The one 5xx the API promises: 504 for a deadline no exit can meet (documented in the
    # OpenAPI schema), and only to a request that gave one: the schema's valid deadlines
    # include ones shorter than the first exit's latency.
    deadline_miss = (r.status_code == 504 and _asked_for_a_deadline(r)
                     and r.json()["detail"].startswith("the deadline"))
    assert r.status_code < 500 or deadline_miss, (r.status_code, r.text[:500])
    if r.request.url.path == "/metrics" and r.status_code == 200:
        return
    body = r.json()
    if r.status_code == 200 and r.request.url.path == "/v1/predict":
        PredictResponse.model_validate(body)
    elif r.status_code >= 400:
        assert isinstance(body["detail"], str) and body["detail"], body
    if r.status_code == 503:
        assert r.headers["retry-after"].isdigit()


@settings(max_examples=200, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_predict_fuzzed_from_the_openapi_schema_never_5xx(
        api: tuple[httpx.Client, dict], data: st.DataObject) -> None:
    c, schema = api
    op = schema["paths"]["/v1/predict"]["post"]
    params = data.draw(query(op), "query")
    content_type = data.draw(st.sampled_from([*op["requestBody"]["content"], *EXTRA_TYPES]),
                             "content type")
    if content_type == "multipart/form-data":
        parts = data.draw(multipart_parts(), "parts")
        files = [(name, (fn or "upload", body)) for name, (fn, body) in parts]
        r = (c.post("/v1/predict", params=params, files=files) if files
             else c.post("/v1/predict", params=params, data={"x": "1"}))
    else:
        body = data.draw(BODIES.get(content_type, ANY_BODY), "body")
        r = c.post("/v1/predict", params=params, content=body,
                   headers={"Content-Type": content_type} if content_type else {})
    well_formed(r)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_documented_endpoint_with_junk_queries_never_5xx(
        api: tuple[httpx.Client, dict], data: st.DataObject) -> None:
    c, schema = api
    path, ops = data.draw(st.sampled_from(sorted(schema["paths"].items())), "path")
    method = data.draw(st.sampled_from([*ops, "get", "post", "delete"]), "method")
    params = data.draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)),
                                max_size=3), "query")
    r = c.request(method.upper(), path, params=params, content=data.draw(
        st.binary(max_size=32), "body"))
    assert r.status_code < 500, (method, path, r.status_code, r.text[:300])


V2_INPUT = {"name": "image", "datatype": "FP32", "shape": [1, *SHAPE],
            "data": [0.0] * int(np.prod(SHAPE))}


@st.composite
def v2_documents(draw: st.DrawFn) -> dict[str, Any]:
    """An infer request with any JSON at one of the places the protocol gives a shape to:
    the request's, the input's or an output's parameters, the outputs, the input itself,
    its shape or data."""
    junk = draw(json_values)
    doc: dict[str, Any] = {"inputs": [dict(V2_INPUT)]}
    where = draw(st.sampled_from(["parameters", "outputs", "inputs", "input", "input.parameters",
                                  "input.shape", "input.data", "input.datatype",
                                  "output.parameters", "id"]))
    if where.startswith("input."):
        doc["inputs"][0][where.split(".")[1]] = junk
    elif where == "input":
        doc["inputs"] = [junk]
    elif where == "output.parameters":
        doc["outputs"] = [{"name": "exit", "parameters": junk}]
    else:
        doc[where] = junk
    return doc


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=v2_documents())
def test_v2_infer_with_junk_in_every_field_never_5xx(api: tuple[httpx.Client, dict],
                                                       doc: dict[str, Any]) -> None:
    c, _ = api
    r = c.post("/v2/models/byot/infer", content=json.dumps(doc).encode(),  # NaN as Python writes
               headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (doc, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_the_server_still_answers_after_the_fuzzing(api: tuple[httpx.Client, dict]) -> None:
    c, _ = api
    assert c.get("/readyz").status_code == 200
    r = c.post("/v1/predict", content=npy_bytes(np.zeros((2, *SHAPE), np.float32)),
               headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    metrics = c.get("/metrics").text
    assert not re.search(r'status="5(?!04)', metrics), metrics  # 504s: deadlines asked for
