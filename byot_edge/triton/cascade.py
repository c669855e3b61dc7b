"""The cascade model's logic inside Triton's Python backend (model_py/cascade.py calls it).

BLS mode: `AnytimeModel` over a `TritonBLSBackend`, so the segment models run one step at
a time on the samples still undecided, with the runtime's own policies. In-process mode:
`AnytimeModel` on the deploy folder's files. Requests that Triton's dynamic batcher hands
over together, with the same parameters and no budget, share one cascade run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.manifest import load_manifest
from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.preprocess import check_batch
from byot_edge.triton.bls import TritonBLSBackend, TritonModelError
from byot_edge.triton.config import instance_device
from byot_edge.triton.protocol import INPUT, Request, answer_tensors, parse_parameters
from byot_edge.triton.repository import read_record, verify_repository


def load_cascade(model_dir: str, pb_utils: Any, device: str | None = None) -> AnytimeModel:
    """The AnytimeModel the repository describes, after checking every file's sha256; in
    process, on `device` (the GPU Triton placed the instance on)."""
    root, record = read_record(model_dir)
    verify_repository(root, record)
    manifest_path = root / record["manifest"]
    if record["mode"] == "bls":
        manifest = load_manifest(manifest_path)
        models = {artifact: m["model"] for artifact, m in record["models"].items()}
        return AnytimeModel(manifest, TritonBLSBackend(manifest, models, pb_utils,
                                                       record["backend"]))
    onnx = record["backend"] == "onnxruntime"
    options = {"threads": record["threads"]} if onnx and record.get("threads") else {}
    model = AnytimeModel.load(manifest_path, backend=record["backend"], device=device,
                              **options)
    model.warmup(1)
    return model


def _parameters(text: str | None) -> dict[str, Any]:
    """The request's parameters (Triton passes them as a JSON string), as a dict."""
    try:
        params = json.loads(text or "{}")
    except ValueError:
        raise ByotError(f"the request's parameters are not JSON: {str(text)[:80]!r}") from None
    if not isinstance(params, dict):
        raise ByotError("the request's parameters must be a map of name to value, e.g. "
                        f'{{"threshold": 0.9}}, got {json.dumps(params)[:80]}')
    return params


class CascadeModel:
    def __init__(self, model: AnytimeModel, pb_utils: Any) -> None:
        self.model = model
        self._pb = pb_utils

    @classmethod
    def from_args(cls, args: dict[str, str], pb_utils: Any) -> CascadeModel:
        return cls(load_cascade(args["model_repository"], pb_utils, instance_device(args)),
                   pb_utils)

    def parse(self, request: Any) -> tuple[np.ndarray, Request]:
        """One request's batch and parameters; a ByotError says what the client got wrong."""
        pb, model = self._pb, self.model
        tensor = pb.get_input_tensor_by_name(request, INPUT)
        if tensor is None:
            raise ByotError(f"the request has no input {INPUT!r}; send the batch [N, C, H, W] "
                            f"as the input named {INPUT!r}")
        x = check_batch(tensor.as_numpy(), model.manifest.input)
        params = _parameters(request.parameters())
        return x, parse_parameters(params, model.num_exits, len(model.class_names))

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """One response per request, in order. Requests that Triton batched together are
        answered each on its own: a bad one gets its error, the others their answers."""
        answers: list[Any] = [None] * len(requests)
        groups: dict[str, list[tuple[int, np.ndarray, Request]]] = {}
        for i, request in enumerate(requests):
            try:
                x, parsed = self.parse(request)
            except ByotError as e:
                answers[i] = self._error(str(e), client=True)
                continue
            except Exception as e:  # a bug on this request: its error, not the batch's
                answers[i] = self._error(f"could not read the request: {e!r}", client=False)
                continue
            key = repr(parsed) if parsed.batchable else f"alone {i}"
            groups.setdefault(key, []).append((i, x, parsed))
        for members in groups.values():
            self._run_group(members, answers)
        return answers

    def _run_group(self, members: list[tuple[int, np.ndarray, Request]],
                   answers: list[Any]) -> None:
        pb, parsed = self._pb, members[0][2]
        x = np.concatenate([m[1] for m in members]) if len(members) > 1 else members[0][1]
        try:
            result = self.model.run(x, parsed.options)
        except ByotError as e:
            for i, _, _ in members:
                answers[i] = self._error(str(e), client=True)
            return
        except Exception as e:  # a segment model or the backend failed: this group only
            message = str(e) if isinstance(e, TritonModelError) else f"the cascade failed: {e!r}"
            for i, _, _ in members:
                answers[i] = self._error(message, client=False)
            return
        start = 0
        for i, xi, _ in members:
            rows = slice(start, start + len(xi))
            start += len(xi)
            tensors = answer_tensors(result, parsed.top_k, rows)
            answers[i] = pb.InferenceResponse(
                output_tensors=[pb.Tensor(name, np.ascontiguousarray(a))
                                for name, a in tensors.items()])

    def _error(self, message: str, client: bool) -> Any:
        pb = self._pb
        code = pb.TritonError.INVALID_ARG if client else pb.TritonError.INTERNAL
        return pb.InferenceResponse(error=pb.TritonError(message, code))

    def close(self) -> None:
        self.model.close()
