"""Manifest records for an export, and merging them into the manifest a folder already has.

Re-exporting into a folder keeps what other tools wrote there (calibrated thresholds, latency
profiles) and the files of exits not re-exported now, as long as they come from the same
network. "Same" means the same weights file hash (weights.pt is written deterministically
from the state dict and config): files or thresholds made from other weights would silently
disagree with the new ones, so they are dropped and the caller is told. Latency profiles are
kept while the architecture and the precision of the files they timed stay the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from byot_edge.export.graph import Shape
from byot_edge.manifest import (
    SEGMENT_ONNX,
    SEGMENT_TRT,
    TRUNCATED_ONNX,
    TRUNCATED_TRT,
    ExitEntry,
    FileEntry,
    InputSpec,
    LatencyProfile,
    Manifest,
    TensorSpec,
    ValidationSplit,
    backend_precision,
)
from byot_edge.models import MultiExitNet


def tensor_specs(specs: list[tuple[str, Shape]], dtype: str = "float32") -> list[TensorSpec]:
    return [TensorSpec(name, list(shape), dtype) for name, shape in specs]


def input_spec(state: dict[str, Any], model: MultiExitNet) -> InputSpec:
    data = state.get("data") or {}
    cfg = model.config
    c = int(data.get("in_chans", cfg.in_chans))
    s = int(data.get("input_size", cfg.input_size))
    return InputSpec([c, s, s], "float32", "NCHW", [float(v) for v in data.get("mean", [0.0])],
                     [float(v) for v in data.get("std", [1.0])])


def validation_split(state: dict[str, Any]) -> ValidationSplit | None:
    """Which training images the checkpoint's training held out (fraction 0: none), so the
    deployed files can be calibrated on exactly those; None when the checkpoint does not say
    which dataset it was trained on."""
    dataset = (state.get("data") or {}).get("dataset")
    if not dataset:
        return None
    tc = state.get("train_config") or {}
    return ValidationSplit(str(dataset), float(tc.get("val_split") or 0), int(tc.get("seed", 0)))


def class_names(state: dict[str, Any], num_classes: int) -> list[str]:
    names = (state.get("data") or {}).get("class_names")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]  # the checkpoint does not know: indices


def val_accuracy(state: dict[str, Any], k: int) -> float | None:
    values = (state.get("metrics") or {}).get("val_accuracy")
    if not isinstance(values, (list, tuple)) or len(values) < k:
        return None
    v = values[k - 1]
    if not isinstance(v, (int, float)) or v != v:
        return None
    # Stored as a fraction by `train`; a percentage (<= 100) is read as one.
    v = float(v) / 100 if 1 < v <= 100 else float(v)
    return v if 0 <= v <= 1 else None


def exit_entries(state: dict[str, Any], model: MultiExitNet) -> list[ExitEntry]:
    sections, branches = segment_flops(model)
    return [ExitEntry(e.index, e.stage, e.channels, e.stride, e.flops, e.params,
                      val_accuracy(state, e.index), section_flops=section, branch_flops=branch)
            for e, section, branch in zip(model.exits, sections, branches, strict=True)]


def segment_flops(model: MultiExitNet) -> tuple[list[int], list[int]]:
    """Per segment at batch 1: the FLOPs of its section (the stem included in the first) and
    of its exit's branch; what calibration prices a cascade by, without torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    h: Any = torch.zeros(1, model.config.in_chans, model.config.input_size,
                         model.config.input_size)
    sections, branches = [], []
    with torch.no_grad():
        for seg in model.segments():
            with FlopCounterMode(display=False) as counter:
                y = seg.section(seg.prefix(h))
            sections.append(int(counter.get_total_flops()))
            with FlopCounterMode(display=False) as counter:
                seg.head(y)
            branches.append(int(counter.get_total_flops()))
            h = y
    return sections, branches


@dataclass
class Written:
    """The files this export wrote: per exit, {file kind: entry}; and the weights."""

    files: dict[int, dict[str, FileEntry]]
    weights: FileEntry


def merge(existing: Manifest | None, fresh: Manifest, written: Written,
          note: Callable[[str], None] = lambda _: None) -> Manifest:
    """`fresh` (records from the checkpoint) with this export's files, plus what `existing`
    holds that still applies."""
    manifest = fresh
    manifest.weights = written.weights
    if existing is not None:
        same_net = (existing.weights is not None
                    and existing.weights.sha256 == written.weights.sha256
                    and existing.model == fresh.model and existing.num_exits == fresh.num_exits)
        if same_net:
            for old, new in zip(existing.exits, manifest.exits, strict=True):
                new.files = dict(old.files)
            manifest.thresholds = existing.thresholds
        else:
            dropped = [f"{f.path}" for e in existing.exits for f in e.files.values()]
            if dropped:
                note("the folder held an export of other weights: dropped its entries "
                     f"({', '.join(dropped)}) from the manifest")
            if existing.thresholds is not None:
                note("dropped the calibrated thresholds (they were calibrated on other "
                     "weights): run calibration again")
        # Latency depends on the architecture, not on the weights.
        if existing.model == fresh.model and existing.input.shape == fresh.input.shape:
            manifest.latency_profiles = existing.latency_profiles
        elif existing.latency_profiles:
            note("dropped latency profiles measured on another architecture: profile again")
    for k, files in written.files.items():
        entry = manifest.exits[k - 1]
        entry.files.update(files)
        _drop_stale_engines(entry, note)
    if existing is not None:
        manifest.latency_profiles = _same_precision(existing, manifest, note)
    return manifest


def _same_precision(existing: Manifest, manifest: Manifest,
                    note: Callable[[str], None]) -> list[LatencyProfile]:
    """The profiles that timed files of the precision `manifest` now lists for their
    backend: an fp32 profile kept for int8 files would price them as fp32. A profile that
    records no precision timed the files `existing` listed."""
    kept: list[LatencyProfile] = []
    dropped: list[str] = []
    for p in manifest.latency_profiles:
        timed = p.precision or backend_precision(existing, p.backend)
        now = backend_precision(manifest, p.backend)
        if timed == now:
            kept.append(dataclasses.replace(p, precision=timed))  # recorded from now on
        else:
            dropped.append(f"{p.backend} at batch {p.batch} timed {timed} files, now {now}")
    if dropped:
        note(f"dropped latency profiles of another precision ({'; '.join(dropped)}): run "
             "`byot-edge profile` again")
    return kept


# Each engine stands for one ONNX file (its record names the source's sha256).
_ENGINE_SOURCE = {TRUNCATED_TRT: TRUNCATED_ONNX, SEGMENT_TRT: SEGMENT_ONNX}


def _drop_stale_engines(entry: ExitEntry, note: Callable[[str], None]) -> None:
    """An engine kept from an earlier export whose ONNX file was re-exported differently
    (another batch mode or opset) no longer stands for it: drop it from the manifest."""
    for engine_kind, onnx_kind in _ENGINE_SOURCE.items():
        engine, source = entry.files.get(engine_kind), entry.files.get(onnx_kind)
        if engine is None or source is None:
            continue
        built_from = (engine.engine or {}).get("source", {}).get("sha256")
        if built_from != source.sha256:
            del entry.files[engine_kind]
            note(f"dropped {engine.path} from the manifest: {source.path} changed since it "
                 "was built; rebuild it with --format trt")
