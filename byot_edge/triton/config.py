"""`config.pbtxt` text, per Triton's model configuration (model_config.proto).

Dims leave out the batch axis (the models declare `max_batch_size`); datatypes are the
manifest's numpy dtypes under Triton's names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from byot_edge.errors import ByotError
from byot_edge.manifest import TensorSpec

# numpy dtype name -> Triton's model-config datatype
DATATYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
# The same types as the Open Inference Protocol spells them on the wire
WIRE_DATATYPES = {v: v.removeprefix("TYPE_") for v in DATATYPES.values()}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # TYPE_...
    dims: Sequence[int]  # without the batch axis; -1 is a variable size


@dataclass(frozen=True)
class Batching:
    max_batch: int = 32
    instances: int = 1
    max_queue_delay_us: int = 100
    kind: str = "KIND_CPU"  # KIND_GPU for engines


@dataclass(frozen=True)
class ModelConfig:
    name: str
    inputs: Sequence[Tensor]
    outputs: Sequence[Tensor]
    batching: Batching
    platform: str | None = None  # "onnxruntime_onnx", "tensorrt_plan"; None: the backend's
    backend: str | None = None  # "python"
    parameters: Mapping[str, str] = field(default_factory=dict)


def _quote(text: str) -> str:
    """A protobuf text-format string (its escapes are JSON's for these characters)."""
    return json.dumps(text, ensure_ascii=False)


def datatype(dtype: str) -> str:
    if dtype not in DATATYPES:
        raise ByotError(f"a tensor of dtype {dtype} has no Triton datatype here; re-export "
                        f"with one of {', '.join(DATATYPES)}")
    return DATATYPES[dtype]


def tensor_from_spec(spec: TensorSpec) -> Tensor:
    """A manifest tensor ([batch, ...]: the first axis is the batch) as a Triton tensor."""
    dims = [d if isinstance(d, int) else -1 for d in spec.shape[1:]]
    return Tensor(spec.name, datatype(spec.dtype), dims)


def _tensors(kind: str, tensors: Sequence[Tensor]) -> str:
    items = []
    for t in tensors:
        dims = ", ".join(str(d) for d in t.dims)
        items.append(f'  {{\n    name: {_quote(t.name)}\n    data_type: {t.datatype}\n'
                     f'    dims: [ {dims} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def render(config: ModelConfig) -> str:
    """The model's config.pbtxt."""
    b = config.batching
    lines = [f"name: {_quote(config.name)}"]
    if config.platform:
        lines.append(f"platform: {_quote(config.platform)}")
    if config.backend:
        lines.append(f"backend: {_quote(config.backend)}")
    lines.append(f"max_batch_size: {b.max_batch}")
    text = "\n".join(lines) + "\n"
    text += _tensors("input", config.inputs) + _tensors("output", config.outputs)
    # The dynamic batcher merges requests (and, for segments, the survivors of
    # concurrent cascades) up to max_batch_size, waiting at most this long for more.
    text += (f"dynamic_batching {{\n  max_queue_delay_microseconds: {b.max_queue_delay_us}\n"
             "}\n")
    text += f"instance_group [\n  {{\n    count: {b.instances}\n    kind: {b.kind}\n  }}\n]\n"
    for key, value in config.parameters.items():
        text += (f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: "
                 f"{_quote(value)} }}\n}}\n")
    return text


def instance_device(args: Mapping[str, str]) -> str | None:
    """The device Triton placed this model instance on, from the Python backend's
    `initialize` args: "cuda:N" for a KIND_GPU instance (N = model_instance_device_id, which
    the instance must honour: Triton gives each GPU its own instances), None on the CPU."""
    if str(args.get("model_instance_kind", "")).upper() != "GPU":
        return None
    return f"cuda:{int(args.get('model_instance_device_id') or 0)}"
