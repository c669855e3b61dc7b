"""The calibrate command's work: load the logits, calibrate, write the thresholds, plot.

`calibrate_manifest` reads the logits from a file; `calibrate_engine` collects them by
running the deployed files on the validation split (`calibrate.engine_logits`); both hand a
`ValLogits` to `calibrate_logits`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from byot_edge.calibrate.candidates import Calibration
from byot_edge.calibrate.choose import calibrate
from byot_edge.calibrate.costs import manifest_costs
from byot_edge.calibrate.logits import ValLogits, load_logits, save_val_logits
from byot_edge.calibrate.output import plot_calibration, write_thresholds
from byot_edge.errors import ByotError
from byot_edge.extras import require
from byot_edge.manifest import Manifest, load_manifest


def calibrate_manifest(manifest_path: str | Path, logits_path: str | Path, *,
                       criterion: str = "max_softmax", temperature: bool = False,
                       max_drop: float | None = None, flops_budget: float | None = None,
                       latency_budget_ms: float | None = None,
                       max_worst_case: float | None = None, backend: str | None = None,
                       batch: int | None = None, plot: str | Path | None = None,
                       write: bool = True, **risk: Any) -> Calibration:
    """Load, calibrate, write the thresholds into the manifest, optionally plot. `risk`:
    `calibrate`'s delta, risk, fit_fraction and seed."""
    if plot:  # before any work, rather than after the thresholds are written
        require("matplotlib", "for --plot")
    manifest = load_manifest(manifest_path)
    return calibrate_logits(manifest, load_logits(logits_path), criterion=criterion,
                            temperature=temperature, max_drop=max_drop,
                            flops_budget=flops_budget, latency_budget_ms=latency_budget_ms,
                            max_worst_case=max_worst_case, backend=backend, batch=batch,
                            plot=plot, write=write, **risk)


def calibrate_engine(manifest_path: str | Path, data_dir: str | Path, *,
                     backend: str = "onnxruntime", precision: str | None = None,
                     device: str | None = None, threads: int | None = None,
                     save_logits: str | Path | None = None, criterion: str = "max_softmax",
                     temperature: bool = False, max_drop: float | None = None,
                     flops_budget: float | None = None, latency_budget_ms: float | None = None,
                     max_worst_case: float | None = None, batch: int | None = None,
                     plot: str | Path | None = None, write: bool = True,
                     **risk: Any) -> Calibration:
    """Run the files `backend` serves on the validation split, calibrate on their logits
    (priced with that backend's latency profile where there is one), write and plot."""
    from byot_edge.calibrate.engine_logits import engine_logits

    if plot:
        require("matplotlib", "for --plot")
    manifest = load_manifest(manifest_path)
    val = engine_logits(manifest, data_dir, backend=backend, precision=precision,
                        device=device, threads=threads)
    if save_logits:
        save_val_logits(save_logits, val)
    return calibrate_logits(manifest, val, criterion=criterion, temperature=temperature,
                            max_drop=max_drop, flops_budget=flops_budget,
                            latency_budget_ms=latency_budget_ms, max_worst_case=max_worst_case,
                            backend=val.backend, batch=batch, plot=plot, write=write, **risk)


def calibrate_logits(manifest: Manifest, val: ValLogits, *, criterion: str = "max_softmax",
                     temperature: bool = False, max_drop: float | None = None,
                     flops_budget: float | None = None, latency_budget_ms: float | None = None,
                     max_worst_case: float | None = None, backend: str | None = None,
                     batch: int | None = None, plot: str | Path | None = None,
                     write: bool = True, **risk: Any) -> Calibration:
    """Calibrate `manifest` on logits from any source; write and plot as asked. `risk`:
    `calibrate`'s delta, risk, fit_fraction and seed (risk control, calibrate/risk.py)."""
    if val.logits.shape[2] != len(manifest.class_names):
        raise ByotError(f"{val.path} has {val.logits.shape[2]} classes but the manifest has "
                        f"{len(manifest.class_names)}; evaluate the checkpoint it was exported "
                        "from")
    cal = calibrate(val, manifest_costs(manifest, backend, batch=batch), criterion=criterion,
                    temperature=temperature, max_drop=max_drop, flops_budget=flops_budget,
                    latency_budget_ms=latency_budget_ms, max_worst_case=max_worst_case, **risk)
    if val.dataset and manifest.dataset and val.dataset != manifest.dataset:
        cal.notes.insert(0, f"{val.path} is from dataset {val.dataset!r} but the model was "
                            f"trained on {manifest.dataset!r}")
    for note in cal.notes:
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    if write:
        source = (f"{val.description or val.path.name}: split={val.split}, "
                  f"n={len(val.labels)}, {cal.objective}")
        write_thresholds(manifest, cal, source, val.backend, val.precision)
    if plot:
        plot_calibration(cal, plot)
    return cal
