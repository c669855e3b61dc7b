"""What a client sends and gets back, the same on Triton and on `byot-edge serve`'s /v2 API.

One input tensor, `image` ([N, C, H, W] as the manifest describes it, normalised), and the
request parameters `threshold` (a number, or per-exit numbers as a comma-separated string),
`budget_ms`, `exit` and `top_k`. Each row of the batch is answered with its class index,
its confidence and the exit that answered ([N, 1] each), and its `top_k` most probable
classes with their probabilities ([N, top_k], only when top_k is asked for). With no
parameter the manifest's calibrated thresholds decide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.runtime.anytime import CascadeResult, PredictOptions

DEFAULT_MODEL_NAME = "byot"
INPUT = "image"
CLASS_INDEX = "class_index"
CONFIDENCE = "confidence"
EXIT = "exit"
TOP_K_CLASS = "top_k_class"
TOP_K_PROBABILITY = "top_k_probability"
# (name, Open Inference Protocol datatype, numpy dtype, dims per row; -1: top_k wide)
OUTPUTS = (
    (CLASS_INDEX, "INT64", np.int64, [1]),
    (CONFIDENCE, "FP32", np.float32, [1]),
    (EXIT, "INT64", np.int64, [1]),
    (TOP_K_CLASS, "INT64", np.int64, [-1]),
    (TOP_K_PROBABILITY, "FP32", np.float32, [-1]),
)
PARAMETERS = ("threshold", "budget_ms", "exit", "top_k")


@dataclass(frozen=True)
class Request:
    """One request's parsed parameters."""

    options: PredictOptions
    top_k: int = 0

    @property
    def batchable(self) -> bool:
        """Whether rows of other requests with the same parameters may share its cascade
        run: not under a budget, whose exit (or deadline) depends on the batch size."""
        return self.options.budget_ms is None


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ByotError(f"parameter {name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ByotError(f"parameter {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ByotError(f"parameter {name} must be a finite number, got {value!r}")
    return number


def _integer(name: str, value: Any) -> int:
    number = _number(name, value)
    if number != int(number):
        raise ByotError(f"parameter {name} must be a whole number, got {value!r}")
    return int(number)


def _threshold(value: Any) -> float | tuple[float, ...]:
    # a tuple: options are hashed where requests with equal ones share a batch
    if isinstance(value, str) and "," in value:
        return tuple(_number("threshold", v.strip()) for v in value.split(","))
    return _number("threshold", value)


def parse_parameters(parameters: Mapping[str, Any], num_exits: int,
                     num_classes: int) -> Request:
    """The request's parameters, checked; a ByotError (a 400) names what is wrong."""
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise ByotError(f"unknown parameter(s) {unknown}; this model takes "
                        f"{', '.join(PARAMETERS)}")
    threshold = (_threshold(parameters["threshold"]) if "threshold" in parameters else None)
    budget = _number("budget_ms", parameters["budget_ms"]) if "budget_ms" in parameters else None
    exit_ = _integer("exit", parameters["exit"]) if "exit" in parameters else None
    top_k = _integer("top_k", parameters.get("top_k", 0))
    if not 0 <= top_k <= num_classes:
        raise ByotError(f"top_k must be in 0..{num_classes} (the model has {num_classes} "
                        f"classes), got {top_k}")
    options = PredictOptions(threshold=threshold, budget_ms=budget, exit=exit_)
    options.validate(num_exits)
    if isinstance(threshold, tuple) and len(threshold) != num_exits - 1:
        raise ByotError(f"threshold lists {len(threshold)} numbers; give one, or "
                        f"{num_exits - 1} (one per exit 1..{num_exits - 1})")
    return Request(options, top_k)


def answer_tensors(result: CascadeResult, top_k: int, rows: slice | None = None,
                   probabilities: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Output tensors for `rows` of a cascade's result (default: all); `probabilities`
    ([N, C] of the answering exits) stand in for the result's own where given."""
    rows = rows or slice(None)
    out = {
        CLASS_INDEX: np.array(result.indices[rows], np.int64)[:, None],
        CONFIDENCE: np.array(result.confidences[rows], np.float32)[:, None],
        EXIT: np.array(result.exits[rows], np.int64)[:, None],
    }
    if top_k:
        probabilities = result.probabilities if probabilities is None else probabilities
        if probabilities is None:
            raise ByotError("this model cannot rank its classes (no probabilities); ask "
                            "without top_k")
        p = probabilities[rows]
        # stable sort: equal probabilities keep class order, as the /v1 API's top-k does
        order = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
        out[TOP_K_CLASS] = order.astype(np.int64)
        out[TOP_K_PROBABILITY] = np.take_along_axis(p, order, axis=-1).astype(np.float32)
    return out
