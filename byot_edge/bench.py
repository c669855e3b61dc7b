"""`byot-edge bench`: what each exit costs on this machine, per backend, and what it buys.

Latency comes from `runtime.profile.profile_backend` (warm-up, repeated runs, percentiles);
this module adds throughput and achieved GFLOP/s, accuracy of every exit alone and of the
threshold cascade on real data, device facts (GPU name, clocks, driver; Jetson power from
tegrastats), and writes JSON, CSV and PNG plots.
"""

from __future__ import annotations

import contextlib
import csv
import platform
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.extras import available
from byot_edge.fileio import atomic_write, atomic_write_json
from byot_edge.manifest import LatencyProfile, Manifest, load_manifest
from byot_edge.timing import Progress


@dataclass
class LatencyRow:
    backend: str
    device: str
    batch: int
    artifact: str  # "exit k" (truncated file) or "segment k"
    exit: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    images_per_s: float  # batch / p50
    flops: int | None  # per image; the truncated path's (segments: not counted)
    gflops_per_s: float | None


@dataclass
class AccuracyRow:
    backend: str
    what: str  # "exit k" or "cascade"
    accuracy: float
    ms_per_image: float  # wall time of the whole pass / images, at `batch`
    mean_exit: float
    exit_share: list[float]  # fraction of images answered at each exit
    batch: int


@dataclass
class BenchReport:
    manifest: str
    model: str
    created: str
    machine: dict[str, Any]
    latency: list[LatencyRow] = field(default_factory=list)
    accuracy: list[AccuracyRow] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why
    power: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    for dist in ("onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "tensorrt-rtx"):
        with contextlib.suppress(metadata.PackageNotFoundError):  # without importing it
            info[dist] = metadata.version(dist)
    from byot_edge.runtime.backends.devices import cpu_name

    info["cpu"] = cpu_name()
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.mem,driver_version",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout
            info["gpus"] = [dict(zip(("name", "sm_clock", "mem_clock", "driver"),
                                     (s.strip() for s in line.split(",")), strict=False))
                            for line in out.strip().splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


# tegrastats prints e.g. "... VDD_IN 5071mW/5071mW ..." (Orin) or "POM_5V_IN 3218/3218" (Xavier)
_POWER = re.compile(r"\b(VDD_IN|POM_5V_IN)\s+(\d+)(?:mW)?/(\d+)")


def parse_tegrastats_power(line: str) -> float | None:
    """Instantaneous board input power in watts from one tegrastats line, if it has one."""
    m = _POWER.search(line)
    return int(m.group(2)) / 1000 if m else None


class PowerSampler:
    """Samples board power with tegrastats (Jetson only) while a benchmark runs."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        if shutil.which("tegrastats"):
            self._proc = subprocess.Popen(["tegrastats", "--interval", str(interval_ms)],
                                          stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            watts = parse_tegrastats_power(line)
            if watts is not None:
                self.samples.append(watts)

    def stop(self) -> dict[str, Any] | None:
        if self._proc is None:
            return None
        self._proc.terminate()
        self._proc.wait(timeout=5)
        if not self.samples:
            return {"source": "tegrastats", "samples": 0}
        return {"source": "tegrastats", "samples": len(self.samples),
                "mean_w": float(np.mean(self.samples)), "max_w": float(np.max(self.samples))}


def run_bench(
    manifest_path: str | Path,
    backends: Sequence[str] = ("onnxruntime",),
    batches: Sequence[int] = (1, 8, 32),
    *,
    device: str | None = None,
    data_dir: str | Path | None = None,
    limit: int = 1000,
    eval_batch: int = 1,
    warmup: int = 10,
    runs: int = 100,
    max_seconds: float = 5.0,
    progress: Progress | None = None,
) -> BenchReport:
    from byot_edge.runtime.anytime import AnytimeModel
    from byot_edge.runtime.backends import canonical_backend, get_backend
    from byot_edge.runtime.profile import profile_backend

    manifest = load_manifest(manifest_path)
    report = BenchReport(str(manifest_path), manifest.model["arch"],
                         datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         machine_info())
    data = _test_data(manifest, data_dir, limit) if data_dir else None
    sampler = PowerSampler()
    try:
        for name in backends:
            name = canonical_backend(name)
            try:
                backend = get_backend(name, manifest, device=device)
            except ByotError as e:
                if len(backends) == 1:
                    raise
                report.skipped[name] = str(e)  # e.g. no TensorRT here: bench the others
                if progress:
                    progress(f"skipping {name}: {e}")
                continue
            with backend:
                for profile in profile_backend(backend, batches, warmup=warmup, runs=runs,
                                               max_seconds=max_seconds, progress=progress):
                    report.latency += _latency_rows(profile, manifest)
                if data is not None:
                    report.accuracy += _accuracy_rows(AnytimeModel(manifest, backend), data,
                                                      eval_batch, progress)
    finally:
        report.power = sampler.stop()
    return report


def _latency_rows(profile: LatencyProfile, manifest: Manifest) -> list[LatencyRow]:
    rows = []
    for entry in profile.exits:
        k = entry.exit
        for s, label in ((entry.truncated, "exit"), (entry.segment, "segment")):
            if s is None:
                continue
            ips = profile.batch / (s.p50 / 1e3)
            flops = manifest.exit(k).flops if label == "exit" else None
            rows.append(LatencyRow(
                profile.backend, profile.device, profile.batch, f"{label} {k}", k, s.p50,
                s.p90, s.p99, s.mean, s.runs, ips, flops,
                flops * ips / 1e9 if flops else None))
    return rows


def _test_data(manifest: Any, data_dir: str | Path, limit: int) -> tuple[np.ndarray, np.ndarray]:
    from byot_edge.datasets import load_arrays
    from byot_edge.runtime.preprocess import normalise

    if not manifest.dataset or manifest.dataset == "synthetic":
        raise ByotError("the manifest names no real dataset, so --data-dir cannot be read; "
                        "bench without --data-dir for latency only")
    arrays = load_arrays(manifest.dataset, data_dir, "test",
                         manifest.input.shape[-1] if manifest.dataset == "imagefolder" else None)
    images, labels = arrays.images[:limit], arrays.labels[:limit]
    if tuple(images.shape[1:]) != tuple(manifest.input.shape):
        raise ByotError(f"{manifest.dataset} in {data_dir} gives images of shape "
                        f"{list(images.shape[1:])}, the model takes {manifest.input.shape}")
    return normalise(images, manifest.input), labels


def _accuracy_rows(model: Any, data: tuple[np.ndarray, np.ndarray], batch: int,
                   progress: Progress | None) -> list[AccuracyRow]:
    from byot_edge.runtime.anytime import PredictOptions

    x, labels = data
    choices: list[tuple[str, PredictOptions]] = [
        (f"exit {k}", PredictOptions(exit=k)) for k in range(1, model.num_exits + 1)]
    if model.manifest.thresholds is not None:
        choices.append(("cascade", PredictOptions()))
    rows = []
    for what, options in choices:
        if progress:
            progress(f"{model.backend.name}: accuracy of {what} on {len(labels)} images")
        t = time.perf_counter()
        indices, exits = [], []
        for i in range(0, len(labels), batch):
            result = model.run(x[i:i + batch], options)
            indices.append(result.indices)
            exits.append(result.exits)
        seconds = time.perf_counter() - t
        exit_arr = np.concatenate(exits)
        share = [float((exit_arr == k).mean()) for k in range(1, model.num_exits + 1)]
        rows.append(AccuracyRow(model.backend.name, what,
                                float((np.concatenate(indices) == labels).mean()),
                                seconds / len(labels) * 1e3, float(exit_arr.mean()), share,
                                batch))
    return rows


def write_report(report: BenchReport, out: str | Path) -> list[Path]:
    """bench.json, latency.csv, accuracy.csv (with data), and where matplotlib is installed
    latency.png and accuracy.png."""
    out = Path(out)
    written = [atomic_write_json(out / "bench.json", report.to_dict())]
    written.append(_write_csv(out / "latency.csv", [asdict(r) for r in report.latency]))
    if report.accuracy:
        written.append(_write_csv(out / "accuracy.csv", [asdict(r) for r in report.accuracy]))
    if available("matplotlib"):
        written += _plots(report, out)
    return written


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    if not rows:
        raise ByotError("nothing was measured; check the backends and the manifest's files")

    def write(f: Any) -> None:
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (";".join(map(str, v)) if isinstance(v, list) else v)
                          for k, v in r.items()} for r in rows)
        f.write(text.getvalue().encode())

    return atomic_write(path, write)


def _plots(report: BenchReport, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    batches = sorted({r.batch for r in report.latency})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        for backend in sorted({r.backend for r in report.latency}):
            rows = sorted((r for r in report.latency if r.batch == b and r.backend == backend
                           and r.artifact.startswith("exit")), key=lambda r: r.exit)
            if rows:
                ax.errorbar([r.exit for r in rows], [r.p50_ms for r in rows],
                            yerr=[[0] * len(rows), [r.p99_ms - r.p50_ms for r in rows]],
                            marker="o", capsize=3, label=backend)
        ax.set_title(f"batch {b}")
        ax.set_yscale("log")  # p99 tails on a shared machine dwarf the p50s otherwise
        ax.set_xlabel("exit")
        ax.set_ylabel("latency p50 (ms), bar to p99")
        ax.set_xticks(sorted({r.exit for r in report.latency}))
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.model}: latency per exit", fontsize=10)
    fig.tight_layout()
    paths.append(atomic_write(out / "latency.png",
                              lambda f: fig.savefig(f, format="png", dpi=110)))
    plt.close(fig)
    if report.accuracy:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for backend in sorted({r.backend for r in report.accuracy}):
            rows = [r for r in report.accuracy if r.backend == backend]
            alone = [r for r in rows if r.what != "cascade"]
            ax.plot([r.ms_per_image for r in alone], [100 * r.accuracy for r in alone],
                    marker="o", label=f"{backend}: each exit alone")
            for r in alone:
                ax.annotate(r.what.replace("exit ", "e"), (r.ms_per_image, 100 * r.accuracy),
                            fontsize=7)
            for r in rows:
                if r.what == "cascade":
                    ax.plot(r.ms_per_image, 100 * r.accuracy, marker="*", markersize=12,
                            linestyle="none", label=f"{backend}: cascade (manifest thresholds)")
        ax.set_xlabel(f"ms per image (batch {report.accuracy[0].batch})")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{report.model}: accuracy against latency", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(atomic_write(out / "accuracy.png",
                                  lambda f: fig.savefig(f, format="png", dpi=110)))
        plt.close(fig)
    return paths
