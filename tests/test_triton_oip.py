"""The Open Inference Protocol v2 on `byot-edge serve`, through tritonclient's HTTP client:
the same client, model name, parameters and outputs as the Triton cascade model."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from server_fixtures import running
from test_triton import (  # noqa: F401
    BAD,
    MODES,
    _options,
    assert_same_answers,
    deploy,
    images,
    reference,
)

from byot_edge.runtime.server.oip import decode_request, encode_response

http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed "
                           "(pip install 'byot-edge[triton]')")


@pytest.fixture(scope="module")
def served(deploy):  # noqa: F811
    with running(deploy, "--max-wait-ms", "0") as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    c = http.InferenceServerClient(served.url.removeprefix("http://"))
    yield c
    c.close()


def _infer(client, x, params, binary=True, datatype="FP32"):
    inp = http.InferInput("image", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [http.InferRequestedOutput(n, binary_data=binary)
               for n in ("class_index", "confidence", "exit")]
    if "top_k" in params:
        outputs.append(http.InferRequestedOutput("top_k_class", binary_data=binary))
    return client.infer("byot", [inp], parameters=params, outputs=outputs)


def test_health_and_metadata(client, served):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("byot")
    meta = client.get_model_metadata("byot")
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert [o["name"] for o in meta["outputs"]] == ["class_index", "confidence", "exit",
                                                    "top_k_class", "top_k_probability"]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    with httpx.Client(base_url=served.url, trust_env=False) as c:
        assert c.get("/v2/models/resnet").status_code == 404
        assert c.get("/v2/health/live").status_code == 200


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_answers_equal_the_anytime_model(client, reference, images, binary):  # noqa: F811
    for mode, make in MODES.items():
        for n in (1, 8):
            x = images[:n] if n == 8 else images[5:6]
            params = make(reference, n)
            want = reference.run(x, _options(params))
            got = _infer(client, x, params, binary)
            assert_same_answers(got, want, params, f"{mode}, batch {n}")

def test_bad_requests_get_400_with_the_reason(client, images):  # noqa: F811
    from tritonclient.utils import InferenceServerException

    for what, x, datatype, params, words in BAD:
        x = images[:1] if x is None else x
        with pytest.raises(InferenceServerException) as e:
            _infer(client, x, params, datatype=datatype)
        assert e.value.status() == "400", (what, e.value)
        assert words.lower() in e.value.message().lower(), (what, e.value.message())
    assert client.is_server_live()
    assert _infer(client, images[:2], {}).as_numpy("exit").shape == (2, 1)


def test_binary_framing_round_trip():
    """What the binary extension puts on the wire, parsed back as a client would."""
    doc = {"id": "7", "outputs": [{"name": "exit", "parameters": {"binary_data": True}},
                                  {"name": "confidence"}]}
    tensors = {"exit": np.array([[1], [3]], np.int64),
               "confidence": np.array([[0.5], [0.25]], np.float32)}
    body, headers = encode_response("byot", doc, tensors)
    n = int(headers["inference-header-content-length"])
    head = json.loads(body[:n])
    assert head["id"] == "7" and [o["name"] for o in head["outputs"]] == ["exit", "confidence"]
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert np.frombuffer(body[n:], np.int64).tolist() == [1, 3]
    assert head["outputs"][1]["data"] == [0.5, 0.25]
    parsed, rest = decode_request(body, str(n))
    assert parsed == head and rest == body[n:]
