"""What the runtime says when the precision it serves is not the one things were made for.

Confidences move with precision: an int8 (or fp16) file's softmax is not the fp32 network's,
so thresholds fitted on one precision's logits are not the thresholds for another's. The
anytime model warns once (its once-per-model warning path) when it serves calibrated
thresholds fitted on another precision than the files its backend runs, and when the torch
backend serves a folder whose ONNX files are quantized (it runs the fp32 weights instead).
"""

from __future__ import annotations

from byot_edge.manifest import SEGMENT_ONNX, TRUNCATED_ONNX, Manifest, Thresholds
from byot_edge.runtime.backends import Backend


def threshold_precision_note(thresholds: Thresholds, backend: Backend) -> str | None:
    """A warning when `thresholds` were fitted on another precision than `backend` runs."""
    serving = backend.files_precision()
    if thresholds.precision == serving:
        return None
    return (f"the manifest's thresholds were calibrated on {thresholds.precision} logits "
            f"({thresholds.backend}) but the {backend.name} backend runs {serving} files: "
            "confidences move with precision, so the cascade may miss the accuracy and cost it "
            "was calibrated for; calibrate on the files it serves with `byot-edge calibrate "
            f"{backend.manifest.root / 'manifest.json'} --data-dir DIR --backend "
            f"{backend.name}`")


def backend_precision_note(manifest: Manifest, backend: Backend) -> str | None:
    """A warning when the torch backend stands in for a folder of quantized ONNX files."""
    if backend.file_kinds is not None:
        return None
    onnx = {e.files[kind].precision for e in manifest.exits
            for kind in (TRUNCATED_ONNX, SEGMENT_ONNX) if kind in e.files}
    quantized = sorted(onnx - {"fp32"})
    if not quantized:
        return None
    weights = manifest.weights.path if manifest.weights else "weights.pt"
    return (f"the {backend.name} backend runs the fp32 weights ({weights}), not this "
            f"folder's {'/'.join(quantized)} "
            "ONNX files: its answers and latency are fp32's; use --backend onnxruntime to "
            "serve the quantized files")
