"""Answers and errors as response bytes, without building pydantic models.

The pydantic models in `schemas` document these answers (OpenAPI); on the hot path the
JSON is written here directly from the batch's answers (one argsort and one `tolist` of
the probabilities for the whole request) instead of a model per sample and per class, then validated
again by FastAPI's response model. The bytes are what FastAPI's JSONResponse writes for
the same document (same keys in the same order, same float repr, NaN refused).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np

from byot_edge.errors import ByotError, RequestError
from byot_edge.runtime.batching import Answer

JSON_HEADERS = [(b"content-type", b"application/json")]


def to_json(doc: Any) -> bytes:
    """As starlette's JSONResponse renders: compact, UTF-8, NaN refused."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")


def _labels(indices: list[int], class_names: list[str]) -> list[str]:
    n = len(class_names)
    return [class_names[i] if 0 <= i < n else str(i) for i in indices]


def predict_document(answer: Answer, class_names: list[str], k: int,
                     t0: float) -> dict[str, Any]:
    """One request's answer as the PredictResponse schema describes it; `t0`: its arrival
    (perf_counter), for latency_ms."""
    r = answer.result
    indices = r.indices
    labels = _labels(indices, class_names)
    confidences = r.confidences
    if answer.probabilities is not None:
        if answer.ranked_classes is not None and answer.ranked_probabilities is not None:
            top_index = answer.ranked_classes[:, :k].tolist()  # ranked by the batcher
            top_prob = answer.ranked_probabilities[:, :k].tolist()
        else:
            p = np.asarray(answer.probabilities)
            order = np.argsort(-p, axis=1, kind="stable")[:, :k]
            top_index = order.tolist()
            top_prob = np.take_along_axis(p, order, axis=1).tolist()
        tops = [[{"index": j, "label": name, "probability": q}
                 for j, name, q in zip(js, _labels(js, class_names), qs, strict=True)]
                for js, qs in zip(top_index, top_prob, strict=True)]
    else:  # the runner-ups are unknown: the answer alone
        tops = [[{"index": i, "label": name, "probability": c}]
                for i, name, c in zip(indices, labels, confidences, strict=True)]
    preds = [{"index": i, "label": name, "confidence": c, "exit": e, "top_k": top,
              "model_ms": ms}
             for i, name, c, e, top, ms in zip(indices, labels, confidences, r.exits, tops,
                                               r.latency_ms, strict=True)]
    return {"predictions": preds, "mode": r.mode,
            "latency_ms": (time.perf_counter() - t0) * 1e3, "queue_ms": float(answer.queue_ms),
            "batch_size": int(answer.batch_size), "warnings": list(r.warnings),
            "deadline_ms": answer.deadline_ms, "deadline_left_ms": answer.deadline_left_now_ms()}


def error_parts(exc: BaseException) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, body and extra headers of the answer to `exc`: a RequestError its status
    (Retry-After with 503), another ByotError 422, anything else 500 (a bug)."""
    if isinstance(exc, RequestError):
        headers = ([] if exc.retry_after is None
                   else [(b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode())])
        return exc.status, to_json({"detail": exc.detail}), headers
    if isinstance(exc, ByotError):
        return 422, to_json({"detail": str(exc)}), []
    return 500, to_json({"detail": "internal server error; see the server's log"}), []
