"""What one ONNX file says about itself (`metadata_props`), for people and tools that open it.

The runtime never reads this: it serves from the manifest, which holds the same facts and
the sha256 that ties each file to them. The metadata is for a file that travels alone (a
model zoo, a colleague's inbox): Netron lists it under the model's properties, and
`onnx.load(f).metadata_props` or onnxruntime's `session.get_modelmeta().custom_metadata_map`
return it, so the class names, the input's mean/std and which exit the file is can be read
without the folder it came from. Keys are namespaced `byot_edge.*`; values are JSON text
(ONNX metadata values are strings). `onnx_metadata.schema.json` in this package describes
the decoded values (the export tests check every written file against it).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

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
