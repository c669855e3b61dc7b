"""TensorRT engines from the exported ONNX files: one per exit and per segment.

One builder path for TensorRT 10.3 (JetPack 6), current TensorRT 10.x/11 and TensorRT for
RTX (`tensorrt_rtx`, same build API). What differs is how precision gets in:
- weakly typed (TensorRT < 10.12, where the builder flags are current): the checked fp32
  ONNX file plus the FP16/INT8 builder flags;
- strongly typed (TensorRT >= 10.12, 11.x, TensorRT-RTX: the flags are deprecated or gone):
  the precision lives in the graph, so fp16 is a float16 capture of the network and int8 a
  Q/DQ graph (see precision.py), each with float32 inputs and outputs.
int8 always uses explicit Q/DQ quantization calibrated on training images from `--data-dir`
(calibration_set.py: the same picks as the int8 ONNX files; the implicit calibrator API,
IInt8EntropyCalibrator2, is deprecated since 10.1 and gone in 11).

Engines only run on the TensorRT version and GPU they were built for, so each engine's
manifest record says which (plus precision, profile and source file); the runtime refuses
a mismatch. TensorRT itself is imported only here, and only when engines are asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from byot_edge.errors import ByotError
from byot_edge.export.checks import CheckReport
from byot_edge.export.trt_env import BuildTarget, build_target, import_tensorrt, version_tuple
from byot_edge.fileio import atomic_write_bytes, sha256_file
from byot_edge.manifest import FileEntry, TensorSpec

if TYPE_CHECKING:
    from byot_edge.export.staging import Staging

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_BATCH_RANGE = (1, 8, 32)
TIMING_CACHE_NAME = "timing.cache"
# The first TensorRT release whose weak-typing APIs (precision builder flags) are deprecated.
STRONG_TYPING_FROM = (10, 12)


def check_batch_range(batch_range: tuple[int, int, int] | None) -> None:
    """The profile's batches in order. Checked whatever --format asks for: with ONNX files
    only, a range nothing used was accepted as it came (min > opt included)."""
    if batch_range is None:
        return
    lo, opt, hi = batch_range
    if not 1 <= lo <= opt <= hi:
        raise ByotError(f"--batch-range must be min,opt,max with 1 <= min <= opt <= max "
                        f"(e.g. 1,8,32); got {lo},{opt},{hi}")


@dataclass
class TrtOptions:
    precision: str = "fp32"  # fp32 | fp16 | int8
    batch_range: tuple[int, int, int] | None = None  # (min, opt, max); default (1, 8, 32)
    workspace_mb: int = 1024
    timing_cache: Path | None = None  # default: OUT/timing.cache (not used by TensorRT-RTX)
    module: str = "auto"  # auto (tensorrt, else tensorrt_rtx) | tensorrt | tensorrt_rtx
    # TensorRT-RTX only: build ahead of time for this compute capability ("8.9"), no GPU needed.
    compute_capability: str | None = None
    calibration_samples: int = 256  # int8: images from --data-dir


@dataclass
class BuildJob:
    """One engine to build: from which ONNX graph, registered under which name."""

    exit: int
    kind: str  # manifest file kind: "trt" | "segment_trt"
    name: str  # e.g. "exit2.engine"
    onnx_path: Path  # the graph TensorRT parses (the checked file, or its fp16/int8 twin)
    source: FileEntry  # the checked fp32 ONNX file this engine stands for


class EngineBuilder:
    """Builds engines with one TensorRT module, one target and one timing cache."""

    def __init__(self, options: TrtOptions, say: Callable[[str], None]) -> None:
        if options.precision not in PRECISIONS:
            raise ByotError(f"unknown precision {options.precision!r}; choose one of: "
                            f"{', '.join(PRECISIONS)}")
        if options.workspace_mb < 1:
            raise ByotError(f"--workspace-mb must be >= 1, got {options.workspace_mb}")
        self.options = options
        self.say = say
        self.trt, self.module = import_tensorrt(options.module)
        self.version = str(self.trt.__version__)
        self.rtx = self.module == "tensorrt_rtx"
        # RTX and 11.x are always strongly typed; 10.12+ deprecates the weak-typing flags.
        self.strongly_typed = (self.rtx or version_tuple(self.version) >= STRONG_TYPING_FROM
                               or not hasattr(self.trt.BuilderFlag, "FP16"))
        self.target: BuildTarget = build_target(self.trt, self.rtx, options.compute_capability)
        self.logger = self.trt.Logger(self.trt.Logger.ERROR)
        self.batch_range = options.batch_range or DEFAULT_BATCH_RANGE

    def check_batch(self, batch: int | None) -> None:
        """A static --batch fixes the profile; a --batch-range must agree with it."""
        lo, opt, hi = self.options.batch_range or ((batch,) * 3 if batch else DEFAULT_BATCH_RANGE)
        check_batch_range((lo, opt, hi))
        if batch is not None and (lo, opt, hi) != (batch, batch, batch):
            raise ByotError(f"--batch {batch} makes the ONNX batch static, so the engine profile "
                            f"is {batch},{batch},{batch}; drop --batch-range or --batch")
        self.batch_range = (lo, opt, hi)

    # --- building -----------------------------------------------------------------------

    def build(self, job: BuildJob, stage: Staging,
              timing_cache: Any) -> tuple[FileEntry, CheckReport]:
        trt = self.trt
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if (
            self.strongly_typed and not self.rtx) else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(job.onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ByotError(f"TensorRT {self.version} cannot parse {job.source.path} (exit "
                            f"{job.exit}): {errors[:300]}; try another --opset")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.options.workspace_mb << 20)
        precision_flags = self._set_precision(config)
        self.target.apply(trt, config)
        if timing_cache is not None:
            config.set_timing_cache(timing_cache, False)
        profile, shapes = self._profile(builder, network)
        config.add_optimization_profile(profile)
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ByotError(f"TensorRT {self.version} failed to build {job.name} (exit "
                            f"{job.exit}); rerun with a larger --workspace-mb, or --precision fp32")
        data = bytes(serialized)
        path = stage.write_bytes(job.name, data)
        io = _network_io(trt, network)
        record = {
            "module": self.module,
            "tensorrt_version": self.version,
            **self.target.record(),
            "precision": self.options.precision,
            "strongly_typed": self.strongly_typed,
            "builder_flags": precision_flags,
            "batch_range": list(self.batch_range),
            "profile_shapes": shapes,
            "workspace_mb": self.options.workspace_mb,
            "timing_cache": timing_cache is not None,
            "source": {"path": job.source.path, "sha256": job.source.sha256},
            "build_seconds": round(time.perf_counter() - start, 3),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        entry = FileEntry(job.name, sha256_file(path), _specs(io, "input"), _specs(io, "output"),
                          record)
        return entry, self._check(job, entry, shapes, data)

    def _set_precision(self, config: Any) -> list[str]:
        """Builder flags for weakly typed builds; none when the graph carries the precision."""
        trt, flags = self.trt, []
        if hasattr(trt.BuilderFlag, "TF32") and not self.rtx:
            # fp32 means fp32: TF32 convolutions would differ from the checked ONNX by ~1e-3.
            config.clear_flag(trt.BuilderFlag.TF32)
        if self.strongly_typed or self.options.precision == "fp32":
            return flags
        # Weakly typed (TensorRT < 10.12): fp16 lets TensorRT pick fp16 kernels; int8 runs the
        # Q/DQ graph's quantized layers in int8 and lets the rest use fp16.
        config.set_flag(trt.BuilderFlag.FP16)
        flags.append("FP16")
        if self.options.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            flags.append("INT8")
        return flags

    def _profile(self, builder: Any, network: Any) -> tuple[Any, dict[str, dict[str, list[int]]]]:
        lo, opt, hi = self.batch_range
        profile = builder.create_optimization_profile()
        shapes = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            rest = list(tensor.shape)[1:]
            mins, opts, maxs = ([b, *rest] for b in (lo, opt, hi))
            profile.set_shape(tensor.name, mins, opts, maxs)
            shapes[tensor.name] = {"min": mins, "opt": opts, "max": maxs}
        return profile, shapes

    def _check(self, job: BuildJob, entry: FileEntry, shapes: dict[str, dict[str, list[int]]],
               data: bytes) -> CheckReport:
        """The engine's inputs, outputs and profile against the ONNX file it stands for.

        On a machine with the target GPU the engine itself is deserialized and asked; without
        one (TensorRT-RTX ahead-of-time builds) the builder's network is what can be checked.
        Running the engine is the runtime's job: it needs the GPU.
        """
        kind = "engine" if job.kind == "trt" else "segment_engine"
        problems = []
        want_in = [t.name for t in job.source.inputs]
        want_out = [t.name for t in job.source.outputs]
        if [t.name for t in entry.inputs] != want_in or [t.name for t in entry.outputs] != want_out:
            problems.append(f"tensors {[t.name for t in entry.inputs]} -> "
                            f"{[t.name for t in entry.outputs]}, ONNX has {want_in} -> {want_out}")
        checked_by = "trt-builder"
        engine_io = self._engine_io(data) if self.target.has_gpu else None
        if engine_io is not None:
            checked_by = "trt-runtime"
            for name, (mins, opts, maxs) in engine_io.items():
                want = shapes.get(name)
                if want and [mins, opts, maxs] != [want["min"], want["opt"], want["max"]]:
                    problems.append(f"profile of {name} is {mins}/{opts}/{maxs}, asked {want}")
        note = "; ".join(problems) or (
            f"profile batch {'/'.join(map(str, self.batch_range))}, "
            f"{self.options.precision}; not run here (needs the runtime on the GPU)")
        return CheckReport(job.name, job.exit, kind, checked_by, not problems, note=note)

    def _engine_io(self, data: bytes) -> dict[str, tuple[list[int], ...]] | None:
        runtime = self.trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            return None
        out = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT:
                out[name] = tuple(list(s) for s in engine.get_tensor_profile_shape(name, 0))
        return out

    # --- all engines of an export ---------------------------------------------------------

    def build_all(self, stage: Staging, jobs: list[BuildJob],
                  cache_path: Path) -> tuple[dict[tuple[int, str], FileEntry], list[CheckReport]]:
        cache = self._load_cache(cache_path)
        entries, reports = {}, []
        for job in jobs:
            self.say(f"building {job.name} with {self.module} {self.version} "
                     f"({self.options.precision}, {self.target.describe()})")
            entry, report = self.build(job, stage, cache)
            entries[(job.exit, job.kind)] = entry
            reports.append(report)
        if cache is not None:
            atomic_write_bytes(cache_path, bytes(cache.serialize()))
        return entries, reports

    def _load_cache(self, path: Path) -> Any:
        """The timing cache shared by every build (and by later exports to the same folder).

        TensorRT-RTX has no timing cache (its API is a deprecated no-op there)."""
        if self.rtx:
            return None
        config = self.trt.Builder(self.logger).create_builder_config()
        data = path.read_bytes() if path.is_file() else b""
        cache = config.create_timing_cache(data)
        if cache is None and data:  # from another TensorRT version or GPU: start afresh
            self.say(f"ignoring timing cache {path}: it does not match this TensorRT/GPU")
            cache = config.create_timing_cache(b"")
        return cache


def _network_io(trt: Any, network: Any) -> list[tuple[str, str, list[int | str], str]]:
    """(direction, name, shape with "batch" for -1, dtype) of the parsed network's tensors."""
    out = []
    for direction, count, get in (("input", network.num_inputs, network.get_input),
                                  ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            shape: list[int | str] = ["batch" if d < 0 else int(d) for d in t.shape]
            out.append((direction, t.name, shape, _dtype_name(trt, t.dtype)))
    return out


def _dtype_name(trt: Any, dtype: Any) -> str:
    names = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16",
             trt.DataType.INT8: "int8", trt.DataType.INT32: "int32"}
    return names.get(dtype, str(dtype).rsplit(".", 1)[-1].lower())


def _specs(io: list[tuple[str, str, list[int | str], str]], direction: str) -> list[TensorSpec]:
    return [TensorSpec(name, shape, dtype) for d, name, shape, dtype in io if d == direction]

