"""`export_checkpoint`: a checkpoint -> checked ONNX files (and TensorRT engines) + manifest.

Order of work: capture the network once (graph.py), cut each requested exit and, with
`segments`, every cascade segment out of it, stamp each file with its metadata, write it
under a temp name, run `onnx.checker` and then ONNX Runtime against PyTorch on the same
inputs. Only when every file passed are the files renamed to their final names and the
manifest (merged with what the folder held) written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from byot_edge.checkpoint import load_checkpoint
from byot_edge.errors import ByotError
from byot_edge.export import graph
from byot_edge.export.checks import (
    CHECK_SAMPLES,
    CheckReport,
    check_exit,
    check_inputs,
    check_segments,
    failure_message,
    torch_outputs,
)
from byot_edge.export.metadata import essentials, write_metadata
from byot_edge.export.records import (
    Written,
    class_names,
    exit_entries,
    input_spec,
    merge,
    tensor_specs,
    val_accuracy,
    validation_split,
)
from byot_edge.export.staging import Staging, staging
from byot_edge.fileio import sha256_file
from byot_edge.manifest import (
    MANIFEST_NAME,
    SEGMENT_ONNX,
    TRUNCATED_ONNX,
    FileEntry,
    Manifest,
    TensorSpec,
    load_manifest,
)
from byot_edge.models import MultiExitNet, model_from_config

if TYPE_CHECKING:
    from byot_edge.export.calibration_set import CalibrationSet
    from byot_edge.export.trt_build import EngineBuilder, TrtOptions

FORMATS = ("onnx", "trt")
WEIGHTS_NAME = "weights.pt"


def exit_file(k: int) -> str:
    return f"exit{k}.onnx"


def segment_file(k: int) -> str:
    return f"segment{k}.onnx"


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    exits: list[int] | None = None,
    segments: bool = False,
    formats: tuple[str, ...] = ("onnx",),
    batch: int | None = None,
    data_dir: str | Path | None = None,
    dataset: str | None = None,
    rtol: float = 1e-4,
    opset: int | None = None,
    trt_options: TrtOptions | None = None,
    progress: Callable[[str], None] | None = None,
    exporter: graph.Exporter = "auto",
    precision: str | None = None,
    calibration_images: int | None = None,
    int8_agreement: float | None = None,
    notes: Callable[[str], None] | None = None,
) -> tuple[Manifest, list[CheckReport]]:
    """Export exits (default: all) of `checkpoint` into `out_dir`; see the module docstring.

    `formats`: "onnx" always happens (engines are built from the ONNX files); "trt" adds a
    TensorRT engine per written file. `batch`: a static batch size (default: a dynamic
    "batch" axis). `precision` (default: `trt_options`'): int8 with "onnx" writes int8 ONNX
    files (quantize.py), calibrated on `calibration_images` training images; with "trt" only,
    fp32 ONNX files and int8 engines. Raises ByotError, writing nothing, if any check fails.
    `notes`: told what the folder held and this export dropped from its manifest (thresholds,
    profiles, engines); default `progress`.
    """
    say = progress or (lambda _: None)
    precision = precision or (trt_options.precision if trt_options else "fp32")
    formats = _check_args(formats, batch, rtol, opset, exporter)
    _check_precision(precision, formats, calibration_images, int8_agreement)
    from byot_edge.export.trt_build import check_batch_range

    check_batch_range(trt_options.batch_range if trt_options else None)
    if trt_options is not None:  # one precision for the whole export (caller's copy kept)
        trt_options = dataclasses.replace(trt_options, precision=precision)
    out = Path(out_dir)
    builder = None
    if "trt" in formats:  # before the long part: a missing TensorRT fails at once
        from byot_edge.export.trt_build import EngineBuilder, TrtOptions

        builder = EngineBuilder(trt_options or TrtOptions(precision=precision), say)
    existing = _existing_manifest(out)
    model, state = _load(checkpoint)
    wanted = sorted(set(exits or range(1, model.num_exits + 1)))
    for k in wanted:
        model.check_exit(k)
    if builder is not None:
        builder.check_batch(batch)

    spec = input_spec(state, model)
    calib = None
    if precision == "int8":  # before the long part: missing data fails at once
        calib = _calibration_images(state, spec.shape, calibration_images, builder, data_dir,
                                    dataset, say)
    say(f"capturing {model.config.arch} ({model.num_exits} exits) as ONNX")
    cap = graph.capture(model, batch=batch, opset=opset, exporter=exporter)
    say(f"captured with the {cap.exporter} exporter, opset {cap.opset}")
    x, source = check_inputs(state, spec.shape, batch or CHECK_SAMPLES, data_dir, dataset)
    say(f"checking on {len(x)} inputs: {source}")
    meta = _metadata(state, model, spec)

    with staging(out) as stage:
        files: dict[int, dict[str, FileEntry]] = {k: {} for k in wanted}
        reports = _stage_checked_onnx(stage, cap, model, wanted, segments, x, rtol, meta, files,
                                      say)
        if calib is not None and "onnx" in formats:
            reports += _quantize(stage, cap, model, files, calib, int8_agreement, meta, say)
        weights = _stage_weights(stage, state, spec, batch)
        if builder is not None:
            reports += _stage_engines(builder, stage, cap, model, files, x, calib, batch, out,
                                      rtol)
        fresh = Manifest(model=dict(state["model_config"]),
                         class_names=class_names(state, model.config.num_classes),
                         input=spec, exits=exit_entries(state, model),
                         dataset=str((state.get("data") or {}).get("dataset", "")),
                         validation=validation_split(state), root=out)
        manifest = merge(existing, fresh, Written(files, weights), notes or say)
        _one_onnx_precision(manifest, out)
        # Validate before anything is renamed: a manifest that cannot be saved aborts cleanly.
        from byot_edge.manifest import validate_manifest_dict

        validate_manifest_dict(manifest.to_dict(), out / MANIFEST_NAME)
        stage.commit()
    manifest.save()
    say(f"wrote {out / MANIFEST_NAME}")
    return manifest, reports


def _calibration_images(state: dict[str, Any], shape: list[int], count: int | None,
                        builder: EngineBuilder | None, data_dir: str | Path | None,
                        dataset: str | None, say: Callable[[str], None]) -> CalibrationSet:
    """The int8 calibration set: `count` training images (else the engine builder's or the
    default number)."""
    from byot_edge.export.calibration_set import DEFAULT_IMAGES, calibration_set

    n_cal = count or (builder.options.calibration_samples if builder else DEFAULT_IMAGES)
    calib = calibration_set(state, shape, n_cal, data_dir, dataset)
    say(f"int8: calibrating on {n_cal} {calib.record['dataset']} training images")
    return calib


def _stage_checked_onnx(stage: Staging, cap: graph.Capture, model: MultiExitNet,
                        wanted: list[int], segments: bool, x: np.ndarray, rtol: float,
                        meta: Callable[[int, str], dict[str, Any]],
                        files: dict[int, dict[str, FileEntry]],
                        say: Callable[[str], None]) -> list[CheckReport]:
    """Stage each wanted exit's truncated file (and the segments), each checked against
    PyTorch; a ByotError naming the failures, before anything else is built."""
    reports = []
    for k in wanted:
        name = exit_file(k)
        proto = graph.truncated(cap, k)
        entry = _stage_onnx(stage, name, proto, meta(k, "exit"))
        ref = torch_outputs(model.truncate(k).eval(), x)[0]
        reports.append(check_exit(stage.path(name), name, k, x, ref, rtol))
        files[k][TRUNCATED_ONNX] = entry
        say(_line(reports[-1]))
    if segments:
        seg_reports = _segments(stage, cap, model, x, rtol, meta, files)
        reports += seg_reports
        for r in seg_reports:
            say(_line(r))
    return _all_passed(reports)


def _stage_engines(builder: EngineBuilder, stage: Staging, cap: graph.Capture,
                   model: MultiExitNet, files: dict[int, dict[str, FileEntry]], x: np.ndarray,
                   calib: CalibrationSet | None, batch: int | None, out: Path,
                   rtol: float) -> list[CheckReport]:
    """A TensorRT engine per staged file, each checked against its ONNX file."""
    from byot_edge.export.engines import build_engines

    # int8: its Q/DQ graph is checked on held-out images, as the int8 ONNX files are.
    reports = build_engines(
        builder, stage, cap, model, files,
        x if calib is None or batch else calib.check_images,
        out_dir=out, rtol=rtol,
        calibration=lambda: calib.images if calib is not None else x,
        calibration_record=calib.record if calib is not None else None)
    bad = [r for r in reports if not r.passed]
    if bad:
        raise ByotError("TensorRT engines do not match their ONNX files: " + "; ".join(
            f"exit {r.exit} ({r.file}): {r.note}" for r in bad) + ". Nothing was written")
    return reports


def _all_passed(reports: list[CheckReport]) -> list[CheckReport]:
    """`reports`, or a ByotError naming every file that failed its check."""
    failed = [r for r in reports if not r.passed]
    if failed:
        raise ByotError(failure_message(failed))
    return reports


def _check_args(formats: tuple[str, ...], batch: int | None, rtol: float, opset: int | None,
                exporter: str) -> tuple[str, ...]:
    """Everything that can be checked before the long part, so a typo fails at once."""
    import onnx

    expanded = {f for fmt in formats for f in (FORMATS if fmt == "all" else (fmt,))}
    unknown = expanded - set(FORMATS)
    if unknown or not expanded:
        raise ByotError(f"unknown --format {', '.join(sorted(unknown)) or '(none)'}; choose "
                        "onnx, trt or all")
    if exporter not in graph.EXPORTERS:
        raise ByotError(f"unknown --exporter {exporter!r}; choose one of: "
                        f"{', '.join(graph.EXPORTERS)}")
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not graph.MIN_OPSET <= opset <= newest:
        raise ByotError(f"--opset {opset} is out of range: the exporters here write opsets "
                        f"{graph.MIN_OPSET}..{newest} (default {graph.DEFAULT_OPSET})")
    if batch is not None and batch < 1:
        raise ByotError(f"--batch must be >= 1, got {batch}; leave it out for a dynamic batch")
    if not rtol > 0:
        raise ByotError(f"--rtol must be > 0, got {rtol}")
    return tuple(f for f in FORMATS if f in expanded)


def _check_precision(precision: str, formats: tuple[str, ...], calibration_images: int | None,
                     int8_agreement: float | None) -> None:
    from byot_edge.export.trt_build import PRECISIONS

    if precision not in PRECISIONS:
        raise ByotError(f"unknown --precision {precision!r}; choose one of: "
                        f"{', '.join(PRECISIONS)}")
    if precision == "fp16" and "trt" not in formats:
        raise ByotError("--precision fp16 is for TensorRT engines: add --format trt (ONNX "
                        "files are fp32, or int8 for ONNX Runtime on the CPU)")
    if precision == "int8" and formats == ("onnx", "trt"):
        # ONNX Runtime's CPU kernels want uint8 activations with 7-bit weights here; TensorRT
        # takes symmetric int8 only: two different graphs, two folders.
        raise ByotError("--precision int8 quantizes ONNX files for ONNX Runtime (--format "
                        "onnx) and TensorRT engines (--format trt) differently: export them "
                        "into two folders, one --format each")
    if precision != "int8" and (calibration_images is not None or int8_agreement is not None):
        raise ByotError("--calibration-images and --int8-agreement only apply with "
                        "--precision int8")
    if calibration_images is not None and calibration_images < 1:
        raise ByotError(f"--calibration-images must be >= 1, got {calibration_images}: int8 "
                        "is calibrated on real training images (e.g. 512)")
    if int8_agreement is not None and not 0 <= int8_agreement <= 1:
        raise ByotError(f"--int8-agreement is a fraction in [0, 1], got {int8_agreement}")


def _quantize(stage: Staging, cap: graph.Capture, model: MultiExitNet,
              files: dict[int, dict[str, FileEntry]], calib: Any, agreement: float | None,
              meta: Callable[[int, str], dict[str, Any]],
              say: Callable[[str], None]) -> list[CheckReport]:
    """The fp32 files, checked, give way to their int8 cuts (quantize.py)."""
    from byot_edge.export import quantize

    scheme = quantize.Scheme()
    say(f"quantizing the network (QDQ, {scheme.activations} activations, per-channel int8 "
        "weights)")
    held_out = calib.check_images
    if cap.batch:  # a static batch: whole batches only (the references must match them)
        held_out = held_out[:len(held_out) // cap.batch * cap.batch]
        if len(held_out) == 0:
            raise ByotError(f"--batch {cap.batch} is static and fewer held-out images are left "
                            "to check the int8 files on: ask for fewer --calibration-images "
                            "or a smaller --batch")
    job = quantize.Int8Export(
        quantize.quantize_capture(cap, calib.images, scheme), held_out,
        calib.check_source, {**calib.record, "scheme": scheme.record()},
        quantize.DEFAULT_MIN_AGREEMENT if agreement is None else agreement)
    say(f"checking the int8 files on {len(calib.check_images)} images: {calib.check_source}")
    reports = quantize.int8_files(job, stage, model, files, meta, _stage_onnx)
    for r in reports:
        say(_line(r))
    return _all_passed(reports)


def _one_onnx_precision(manifest: Manifest, out: Path) -> None:
    """A cascade mixing fp32 and int8 files (kept from an earlier export) would serve one
    precision's segments under the other's exits: refuse it before anything is renamed."""
    seen = {f.precision: f.path for e in manifest.exits for kind, f in e.files.items()
            if kind in (TRUNCATED_ONNX, SEGMENT_ONNX)}
    if len(seen) > 1:
        listed = ", ".join(f"{p} ({path})" for p, path in sorted(seen.items()))
        raise ByotError(f"{out} would hold ONNX files of several precisions: {listed}; export "
                        "into a fresh --out, or re-export every exit (and --segments) there")


def _existing_manifest(out: Path) -> Manifest | None:
    if not (out / MANIFEST_NAME).exists():
        return None
    try:
        return load_manifest(out)
    except ByotError as e:
        raise ByotError(f"{out / MANIFEST_NAME} exists but cannot be updated ({e}); move it "
                        "away or choose another --out") from None


def _load(checkpoint: str | Path) -> tuple[MultiExitNet, dict[str, Any]]:
    state = load_checkpoint(checkpoint)
    try:
        model = model_from_config(state["model_config"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ByotError(f"{checkpoint} is a byot-edge checkpoint but its model does not load "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:150]}); it may be "
                        "corrupt or from an incompatible byot-edge: use another checkpoint"
                        ) from None
    return model.eval(), state


def _metadata(state: dict[str, Any], model: MultiExitNet,
              spec: Any) -> Callable[[int, str], dict[str, Any]]:
    names = class_names(state, model.config.num_classes)
    dataset = str((state.get("data") or {}).get("dataset", ""))
    cfg = dict(state["model_config"])

    def meta(k: int, kind: str) -> dict[str, Any]:
        return essentials(kind=kind, exit_index=k, num_exits=model.num_exits, model_config=cfg,
                          dataset=dataset, input_shape=spec.shape, mean=spec.mean, std=spec.std,
                          class_names=names, val_accuracy=val_accuracy(state, k))

    return meta


def _stage_onnx(stage: Staging, name: str, proto: Any, meta: dict[str, Any]) -> FileEntry:
    import onnx

    write_metadata(proto, meta)
    path = stage.write_bytes(name, proto.SerializeToString())
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ByotError(f"{name} (exit {meta['exit']}) fails onnx.checker: "
                        f"{str(e).splitlines()[0][:200]}; nothing was written: try "
                        "--exporter torchscript or another --opset") from None
    inputs, outputs = graph.io_specs(proto)
    return FileEntry(name, sha256_file(path), tensor_specs(inputs), tensor_specs(outputs))


def _segments(stage: Staging, cap: graph.Capture, model: MultiExitNet, x: np.ndarray,
              rtol: float, meta: Callable[[int, str], dict[str, Any]],
              files: dict[int, dict[str, FileEntry]]) -> list[CheckReport]:
    k_max = model.num_exits
    staged = []
    for k in range(1, k_max + 1):
        name = segment_file(k)
        files.setdefault(k, {})[SEGMENT_ONNX] = _stage_onnx(
            stage, name, graph.segment(cap, k), meta(k, "segment"))
        staged.append((stage.path(name), name))
    # PyTorch's reference: the model's own segments, chained.
    refs, h = [], x
    for seg in model.segments():
        outs = torch_outputs(seg.eval(), h)
        refs.append(outs[-1])
        h = outs[0]
    return check_segments(staged, x, lambda k: refs[k - 1], rtol)


def _stage_weights(stage: Staging, state: dict[str, Any], spec: Any,
                   batch: int | None) -> FileEntry:
    # Plain tensors and builtins only: loads with torch.load(weights_only=True).
    payload = {"model_config": dict(state["model_config"]), "model": state["model"]}
    path = stage.write(WEIGHTS_NAME, lambda f: torch.save(payload, f))
    b: int | str = batch or graph.BATCH_AXIS
    num_classes = int(state["model_config"]["num_classes"])
    return FileEntry(WEIGHTS_NAME, sha256_file(path),
                     [TensorSpec(graph.INPUT, [b, *spec.shape])],
                     [TensorSpec(graph.LOGITS, [b, num_classes])])


def _line(r: CheckReport) -> str:
    if r.max_rel is None:
        return f"{r.file}: {'ok' if r.passed else 'FAILED'} {r.note}".rstrip()
    return (f"{r.file}: max abs {r.max_abs:.2e}, rel {r.max_rel:.2e}, top-1 agreement "
            f"{r.top1_agreement:.0%} -> {'ok' if r.passed else 'FAILED'}")


__all__ = ["FORMATS", "WEIGHTS_NAME", "CheckReport", "exit_file", "export_checkpoint",
           "segment_file"]
