"""Request bodies -> the checked batch the model takes: one pass, no web framework.

    limits = Limits(max_samples=32, max_image_pixels=4096 * 4096)
    media = media_type(request.headers["content-type"])       # RequestError 415 if unknown
    x = decode_body(media, body, parts, manifest.input, limits)

A body is a tensor (JSON {"tensor": [...]} or a .npy file; one sample [C, H, W] or a batch
[N, C, H, W]), the bytes of one image, or multipart `file` parts (images or .npy files,
`parts` as (name, bytes)). What comes out is what `check_batch` passes: the model's shape
and dtype, finite, contiguous; the server hands it to the batcher without checking again.

Images are sized from their headers before any is decoded (a small upload can decode to
gigabytes), each is opened once, decoded as `load_image` decodes files, and a request's
images are normalised together. Every refusal is a RequestError with its HTTP status: 400
for a body that cannot be parsed, 413 over a limit, 415 for the content type, 422 for
content that parses but is not what the model takes. Blocking (JSON parsing and image
decoding take milliseconds): a server runs it off its event loop, except where
`decodes_inline` says it is cheaper not to.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from byot_edge.errors import ByotError, RequestError
from byot_edge.manifest import InputSpec
from byot_edge.runtime.preprocess import check_batch, check_image_channels, image_array, normalise

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
NPY_TYPES = ("application/x-npy", "application/octet-stream")
NPY_MAGIC = b"\x93NUMPY"
# What uploads may be: Pillow opens dozens of formats, some with decoders of their own
# (EPS runs Ghostscript); a classifier's clients send these.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# A .npy body up to this size decodes (a copy) faster than a hop to a thread and back.
INLINE_NPY_BYTES = 2**20
# Room for a .npy header: numpy.save writes 128 bytes for a 4-D array.
NPY_HEADER_BYTES = 4096
# What a JSON body may hold besides its numbers' separators ({"tensor": ...} has none).
JSON_SLACK_VALUES = 16
# What parsing a JSON number costs: a float object, its list slot, then a float64 in the
# array (measured: 10 MB of "0.0, " peaked at 96 MiB for 2 M values).
JSON_VALUE_BYTES = 48


@dataclass(frozen=True)
class Limits:
    max_samples: int  # per request
    max_image_pixels: int  # each image's w * h, read from its header
    max_request_pixels: int | None = None  # all of a request's images together


def media_type(content_type: str) -> str:
    """The body's media type (lowercase, without parameters); 415 unless decode_body reads it."""
    media = content_type.split(";")[0].strip().lower()
    if media in (MULTIPART_TYPE, JSON_TYPE, *NPY_TYPES) or media.startswith("image/"):
        return media
    raise RequestError(415, f"unsupported content type {media or '(none)'!r}; send "
                            "multipart/form-data (a `file` part), image/png, image/jpeg, "
                            "application/json or application/x-npy")


def max_body(media: str, spec: InputSpec, limits: Limits, upload: int) -> tuple[int, str | None]:
    """The largest body of `media` worth reading, and the 413's message past it (None: the
    upload limit's own). A .npy body's size follows from its samples: one declaring more
    than `max_samples` of them is refused before a byte is read."""
    if media in NPY_TYPES:
        most = (limits.max_samples * math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
                + NPY_HEADER_BYTES)
        if most < upload:
            return most, (f"the body is larger than a .npy file of at most {limits.max_samples} "
                          f"samples of {list(spec.shape)} {spec.dtype} can be ({most} bytes); "
                          f"the server takes at most {limits.max_samples} per request "
                          "(--max-batch): send fewer samples, as " + spec.dtype)
    return upload, None


def check_json_values(body: bytes, max_values: int, what: str = "the JSON body") -> None:
    """413 when `body` holds more than `max_values` values, counted by their separators
    before it is parsed: a parsed number costs 32 bytes or more, so the cost of parsing is
    bounded by what a request may hold, not by how many bytes it sends."""
    values = json_values(body)
    if values > max_values:
        raise RequestError(413, f"{what} holds about {values} values, more than the "
                                f"{max_values} a request may hold; send fewer samples, or "
                                "send them as .npy (application/x-npy)")


def json_values(body: bytes) -> int:
    """How many values a JSON body holds, at most: its separators, counted unparsed."""
    return body.count(b",") + 1


def decode_bytes(media: str, body: bytes, spec: InputSpec, limits: Limits) -> int:
    """What decoding `body` allocates besides the body, at most (for the server's body
    budget): a JSON tensor's values as Python objects (up to what a request may hold,
    past which it is refused unparsed), a .npy file's copy; images are bounded by their
    pixel limits instead."""
    if media == JSON_TYPE:
        return JSON_VALUE_BYTES * min(json_values(body), _max_json_values(spec, limits))
    return len(body) if media in NPY_TYPES else 0


def _max_json_values(spec: InputSpec, limits: Limits) -> int:
    return limits.max_samples * math.prod(spec.shape) + JSON_SLACK_VALUES


def decodes_inline(media: str, size: int) -> bool:
    """Whether decoding costs less than handing the body to a thread (small .npy files)."""
    return media in NPY_TYPES and size <= INLINE_NPY_BYTES


def decode_body(media: str, body: bytes, parts: Sequence[tuple[str, bytes]] | None,
                spec: InputSpec, limits: Limits) -> np.ndarray:
    """A request's samples as the checked batch the model takes. `parts`: the multipart
    `file` parts (for media multipart/form-data), else None."""
    if media == JSON_TYPE:
        check_json_values(body, _max_json_values(spec, limits))
        x = _tensor(_json_tensor(body), spec, from_json=True)
    elif media in NPY_TYPES:
        x = _tensor(_npy(body, "the body"), spec)
    else:  # images: a raw image body, or the parts
        x = _from_parts(parts if parts is not None else [("the body", body)], spec, limits)
    if len(x) > limits.max_samples:
        raise RequestError(413, f"the request holds {len(x)} samples; the server takes at "
                                f"most {limits.max_samples} per request (--max-batch)")
    return x


# -- tensors ------------------------------------------------------------------------------


def _checked(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    try:
        return check_batch(x, spec)
    except RequestError:
        raise
    except ByotError as e:  # wrong shape, dtype, NaN: the content, not its syntax
        raise RequestError(422, str(e)) from None


def _tensor(x: np.ndarray, spec: InputSpec, from_json: bool = False) -> np.ndarray:
    if x.ndim == 3:  # one sample; the API takes it as a batch of one
        x = x[None]
    if from_json:  # JSON numbers carry no dtype: they are the manifest's
        with np.errstate(over="ignore", invalid="ignore"):
            x = x.astype(spec.dtype)
    return _checked(x, spec)


def _header_end(data: bytes) -> int | None:
    """Where a version 1 or 2 .npy header ends, from its length field; None otherwise."""
    if data.startswith(NPY_MAGIC) and len(data) >= 12:
        if data[6] == 1:
            return 10 + int.from_bytes(data[8:10], "little")
        if data[6] == 2:
            return 12 + int.from_bytes(data[8:12], "little")
    return None


@functools.lru_cache(maxsize=64)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """shape, fortran order, dtype and the data's offset, from a .npy file's first bytes.
    Cached: numpy parses the header with Python's tokenizer (ast.literal_eval), a large
    share of decoding a small tensor, and a client sends the same header again and again.
    A header that fails raises, and is not cached."""
    f = io.BytesIO(head)
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"version {version} is not supported")
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(f)
    return shape, fortran, dtype, f.tell()


def _npy(data: bytes, what: str) -> np.ndarray:
    """A .npy payload, checked before anything is allocated from its header."""
    bad = f"{what} is not a valid .npy file"
    end = _header_end(data)
    # numpy parses the header with Python's tokenizer and literal_eval: on crafted bytes
    # they raise ValueError, SyntaxError, tokenize.TokenError, TypeError...; all mean "bad".
    try:
        shape, fortran, dtype, offset = _npy_header(
            bytes(data[:end]) if end is not None and end <= len(data) else bytes(data[:4096]))
    except Exception as e:
        raise RequestError(400, f"{bad} ({str(e)[:200]}); save it with numpy.save") from None
    if dtype.hasobject:
        raise RequestError(422, f"{what} holds Python objects; send a numeric array")
    # Two negative dimensions multiply to a size the data can match, then reshape raises.
    if any(d < 0 for d in shape):
        raise RequestError(400, f"{bad}: its header has a negative dimension {list(shape)}; "
                                "save the array with numpy.save")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data) - offset:
        raise RequestError(400, f"{bad}: its header says {list(shape)} {dtype} ({expected} "
                                f"bytes) but it holds {len(data) - offset} bytes")
    order = "F" if fortran else "C"
    x = np.frombuffer(data, dtype, offset=offset).reshape(shape, order=order).copy()
    if x.dtype.byteorder == ">" and x.dtype.kind == "f":
        x = x.astype(x.dtype.newbyteorder("="))  # big-endian floats: same values, native order
    return x


def _json_tensor(body: bytes) -> np.ndarray:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "tensor" not in doc:
        raise RequestError(422, 'expected a JSON object {"tensor": [...]} holding one sample '
                                "[C, H, W] or a batch [N, C, H, W] of normalised values")
    extra = sorted(set(doc) - {"tensor"})
    if extra:
        raise RequestError(422, f"unexpected key(s) {extra} in the JSON body; it holds only "
                                '"tensor"; pass options in the query string, e.g. '
                                "/v1/predict?threshold=0.9")
    try:
        x = np.asarray(doc["tensor"])
    except (ValueError, TypeError, RecursionError, OverflowError):
        x = np.asarray(None)  # ragged: reported just below
    if x.dtype.kind not in "iuf" or x.ndim == 0:
        raise RequestError(422, '"tensor" must be a nested list of numbers with a regular '
                                "shape, [C, H, W] or [N, C, H, W]")
    return x


# -- images -------------------------------------------------------------------------------


def _not_image(what: str) -> RequestError:
    return RequestError(422, f"{what} is not an image the server can read; send a PNG or "
                             "JPEG file (or a tensor as JSON or .npy)")


def _open_image(data: bytes, what: str, spec: InputSpec, max_pixels: int) -> Any:
    """The image, opened (its header read, nothing decoded yet); 413 over `max_pixels`."""
    from PIL import Image

    # Pillow's decoders raise many exception types on corrupt input (OSError, SyntaxError,
    # ValueError, struct.error, DecompressionBombError...): all mean "not an image we read".
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Exception:
        raise _not_image(what) from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise RequestError(413, f"{what} is {w}x{h} pixels, over the server's limit of "
                                f"{max_pixels} pixels; resize it to {spec.shape[2]}x"
                                f"{spec.shape[1]} before sending")
    return img


def _from_parts(parts: Sequence[tuple[str, bytes]], spec: InputSpec,
                limits: Limits) -> np.ndarray:
    """Images and .npy files, in order, as one batch: every image sized before any is
    decoded, all of them normalised at once."""
    is_npy = [data.startswith(NPY_MAGIC) for _, data in parts]
    if not all(is_npy):
        try:
            check_image_channels(spec)
        except ByotError:
            raise RequestError(422, f"the model takes {spec.shape[0]}-channel input, not "
                                    "images; send a tensor as JSON or .npy") from None
    opened: list[tuple[str, Any]] = []
    try:
        for (name, data), npy in zip(parts, is_npy, strict=True):
            if not npy:
                opened.append((name, _open_image(data, name, spec, limits.max_image_pixels)))
        total = sum(img.size[0] * img.size[1] for _, img in opened)
        if limits.max_request_pixels is not None and total > limits.max_request_pixels:
            raise RequestError(413, f"the request's {len(opened)} images hold {total} pixels "
                                    "together, over the server's limit of "
                                    f"{limits.max_request_pixels} per request; send fewer or "
                                    f"smaller images (e.g. resized to {spec.shape[2]}x"
                                    f"{spec.shape[1]})")
        pixels = [_decoded(img, name, spec) for name, img in opened]
    finally:
        for _, img in opened:
            img.close()
    images = iter(normalise(np.stack(pixels), spec) if pixels else [])
    batch = [_tensor(_npy(data, name), spec) if npy else next(images)[None]
             for (name, data), npy in zip(parts, is_npy, strict=True)]
    return batch[0] if len(batch) == 1 else np.concatenate(batch)


def _decoded(img: Any, what: str, spec: InputSpec) -> np.ndarray:
    try:
        return image_array(img, spec)
    except Exception:  # a header that opened, then data that does not decode
        raise _not_image(what) from None
