"""What one ONNX file says about itself (`metadata_props`), so it serves without the manifest.

Keys are namespaced `byot_edge.*`; values are JSON text (ONNX metadata values are strings).
`onnx_metadata.schema.json` in this package describes the decoded values.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from byot_edge.errors import ByotError

if TYPE_CHECKING:
    import onnx

METADATA_VERSION = 1
PREFIX = "byot_edge."


def essentials(*, kind: str, exit_index: int, num_exits: int, model_config: dict[str, Any],
               dataset: str, input_shape: list[int], mean: list[float], std: list[float],
               class_names: list[str], val_accuracy: float | None) -> dict[str, Any]:
    return {
        "metadata_version": METADATA_VERSION,
        "kind": kind,  # "exit": image -> logits; "segment": see the manifest's docs
        "exit": exit_index,
        "num_exits": num_exits,
        "arch": model_config["arch"],
        "model_config": model_config,
        "dataset": dataset,
        "input_shape": input_shape,
        "layout": "NCHW",
        "mean": mean,
        "std": std,
        "class_names": class_names,
        "val_accuracy": val_accuracy,
    }


def write_metadata(proto: onnx.ModelProto, values: dict[str, Any]) -> None:
    """Replace the file's `byot_edge.*` metadata with `values` (other keys are kept)."""
    keep = [p for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = PREFIX + key, json.dumps(value)


def read_metadata(proto: onnx.ModelProto) -> dict[str, Any]:
    """The decoded `byot_edge.*` metadata (keys with the prefix, as stored)."""
    return {p.key: json.loads(p.value) for p in proto.metadata_props if p.key.startswith(PREFIX)}


def metadata_schema() -> dict[str, Any]:
    text = resources.files("byot_edge.export").joinpath("onnx_metadata.schema.json").read_text()
    return json.loads(text)


def validate_metadata(proto: onnx.ModelProto, where: str = "ONNX file") -> dict[str, Any]:
    import jsonschema

    values = read_metadata(proto)
    try:
        jsonschema.validate(values, metadata_schema())
    except jsonschema.ValidationError as e:
        raise ByotError(f"{where} has invalid byot-edge metadata ({e.message}); re-export it "
                        "with `byot-edge export`") from None
    return values
