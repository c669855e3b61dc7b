"""`byot-edge predict`, `byot-edge calibrate` and `byot-edge profile`: thin wrappers."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from byot_edge.cli.app import (
    app,
    at_least,
    console,
    csv_values,
    err_console,
    output_file,
    output_folder,
)
from byot_edge.errors import ByotError

if TYPE_CHECKING:
    from byot_edge.calibrate import Calibration

PREDICT_EXAMPLE = """
Examples:

  byot-edge predict deploy/manifest.json cat.png dog.jpg --threshold 0.9

  byot-edge predict deploy/manifest.json img*.png --budget-ms 4 --backend onnxruntime

  byot-edge predict deploy/manifest.json img.png --exit 2 --backend torch
"""

CALIBRATE_EXAMPLE = """
Examples:

  byot-edge calibrate deploy/manifest.json --logits runs/r18/val_logits.npz --max-drop 0.5 --plot curve.png

  byot-edge calibrate deploy/manifest.json --logits val.npz --max-drop 0.5 --delta 0.05 --criterion gate

  byot-edge calibrate deploy/manifest.json --logits val.npz --max-drop 1 --risk disagreement

  byot-edge calibrate deploy/manifest.json --logits val.npz --max-drop 0.5 --point

  byot-edge calibrate deploy/manifest.json --logits val.npz --flops-budget 150M --criterion entropy --temperature

  byot-edge calibrate deploy/manifest.json --logits val.npz --latency-budget-ms 2.5

  byot-edge calibrate deploy-int8/manifest.json --data-dir data/cifar10 --backend onnxruntime --precision int8
"""

PROFILE_EXAMPLE = """
Example:

  byot-edge profile deploy/manifest.json --backend onnxruntime --batch 1,8,32
"""


@contextmanager
def _show_warnings() -> Iterator[None]:
    """Library warnings become yellow lines on stderr rather than Python's source echo."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                if issubclass(w.category, RuntimeWarning) and str(w.message) not in seen:
                    seen.add(str(w.message))
                    err_console.print(f"[yellow]warning:[/] {w.message}", highlight=False,
                                      soft_wrap=True)


def _flops(text: str | None) -> float | None:
    """150M, 1.2G, 3e8 -> FLOPs."""
    if text is None:
        return None
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise ByotError(f"--flops-budget takes FLOPs per sample like 150M, 1.2G or 3e8, got "
                        f"{text!r}") from None


@app.command("predict", epilog=PREDICT_EXAMPLE)
def predict_command(
    manifest: Annotated[Path, typer.Argument(help="manifest.json written by `byot-edge export`.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, ...).")],
    threshold: Annotated[str | None, typer.Option(
        help="Confidence threshold for the cascade: one value, or one per exit 1..K-1.")] = None,
    budget_ms: Annotated[float | None, typer.Option(
        help="Latency budget: the deepest exit whose profiled latency fits (with --threshold: "
             "a cascade that stops before overrunning it).")] = None,
    exit_: Annotated[int | None, typer.Option("--exit", help="Answer from this exit (1..K).")
    ] = None,
    backend: Annotated[str, typer.Option(help="onnxruntime, tensorrt or torch.")] = "onnxruntime",
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: the "
                                                    "backend's choice).")] = None,
    criterion: Annotated[str | None, typer.Option(
        help="max_softmax, entropy or margin (default: the calibrated one).")] = None,
    stat: Annotated[str, typer.Option(help="Profiled statistic a budget is compared with: "
                                           "p50, p90, p99 or mean.")] = "p50",
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for onnxruntime/torch (default: theirs).")] = None,
) -> None:
    """Classify images with the anytime model; without options, the calibrated thresholds."""
    from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
    from byot_edge.runtime.preprocess import load_images

    at_least(threads, 1, "--threads")
    with _show_warnings():
        model = AnytimeModel.load(manifest, backend=backend, device=device,
                                  **({"threads": threads} if threads else {}))
        batch = load_images(images, model.manifest.input)
        model.warmup()  # the table's ms should not include first-run initialisation
        thresholds = None if threshold is None else csv_values(
            threshold, float, "--threshold", "a number or comma-separated numbers like 0.9,0.8")
        opts = PredictOptions(
            thresholds[0] if thresholds and len(thresholds) == 1 else thresholds,
            budget_ms, exit_, criterion, stat)
        result = model.run(batch, opts)
    table = Table("image", "class", "confidence", "exit", "ms",
                  title=f"{result.mode} on {backend} ({model.backend.device})",
                  caption=("ms: from the start of the run until the exit that answered the "
                           "image" + (f" (the {len(images)} images run as one batch)"
                                      if len(images) > 1 else "")))
    for path, p in zip(images, result.predictions(model.class_names), strict=True):
        table.add_row(str(path), p.label, f"{p.confidence:.3f}", str(p.exit), f"{p.latency_ms:.2f}")
    console.print(table)


def _promise(cal: Calibration) -> str:
    """What the chosen thresholds promise, in one line."""
    c, g = cal.chosen, cal.guarantee
    versus = (f"{100 * c.accuracy:.2f}% against the deepest exit's "
              f"{100 * cal.deepest_accuracy:.2f}% on these {cal.num_samples} samples")
    if g is None:
        return (f"point estimate: {versus}; on new data the drop can be larger (no guarantee: "
                "drop --point, or use --max-drop without a budget)")
    return (f"guarantee ({g.method}): {g.describe()}. Measured: {versus}, "
            f"{100 * (1 - c.agreement):.2f}% answered otherwise than it")


def _calibration_table(cal: Calibration, rows: int) -> Table:
    """The frontier (at most `rows` of it, the choice always), then each exit alone."""
    lat = cal.chosen.latency_ms is not None
    table = Table("candidate", "thresholds", "acc %", "Δ pts", "MFLOPs",
                  *(["ms"] if lat else []), "worst", "% at exits", box=box.SIMPLE_HEAD,
                  pad_edge=False,
                  title=f"{cal.objective}: {len(cal.candidates)} candidates on "
                        f"{cal.num_samples} samples (frontier, then each exit alone)",
                  caption=f"criterion {cal.criterion}"
                          + (f", temperatures {[round(t, 3) for t in cal.temperatures]}"
                             if cal.temperatures else "")
                          + (f"; latency: {cal.costs.latency_source}" if lat else ""))
    for col in table.columns[2:]:
        col.no_wrap = True
        col.justify = "right"
    deepest_worst = cal.exits_alone[-1].worst(cal.metric) or 1.0  # "worst": a multiple of it
    frontier = cal.frontier()
    step = max(1, -(-len(frontier) // max(rows, 1)))
    shown = [c for i, c in enumerate(frontier) if i % step == 0]
    if cal.chosen not in shown:
        shown.append(cal.chosen)
    shown.sort(key=lambda c: c.cost(cal.metric))
    for c in [*shown, *cal.exits_alone]:
        chosen = c is cal.chosen
        table.add_row(("→ " if chosen else "") + c.method,
                      " ".join("off" if t > 1 else f"{t:.3f}" for t in c.thresholds) or "-",
                      f"{100 * c.accuracy:.2f}",
                      f"{100 * (c.accuracy - cal.deepest_accuracy):+.2f}", f"{c.flops / 1e6:.2f}",
                      *([f"{c.latency_ms:.3f}" if c.latency_ms is not None else "-"] if lat else []),
                      f"{c.worst(cal.metric) / deepest_worst:.2f}x",
                      " ".join(f"{100 * f:.0f}" for f in c.fractions),
                      style="bold green" if chosen else None)
    return table


@app.command("calibrate", epilog=CALIBRATE_EXAMPLE)
def calibrate_command(
    manifest: Annotated[Path, typer.Argument(help="manifest.json to write the thresholds into.")],
    logits: Annotated[Path | None, typer.Option(
        help="Validation logits from `byot-edge eval --split val --save-logits` (not test).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="Instead of --logits: the dataset folder; runs the deployed files (--backend's) "
             "on the validation split the training held out, and calibrates on their logits.")
    ] = None,
    precision: Annotated[str | None, typer.Option(
        help="With --data-dir: the precision the backend's files must have (fp32, fp16, "
             "int8); default: whatever they are.")] = None,
    device: Annotated[str | None, typer.Option(
        help="With --data-dir: where the backend runs (cpu, cuda, cuda:N).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="With --data-dir: CPU threads for onnxruntime/torch.")] = None,
    save_logits: Annotated[Path | None, typer.Option(
        help="With --data-dir: also save the engine's validation logits (.npz, for --logits).")
    ] = None,
    max_drop: Annotated[float | None, typer.Option(
        help="Accuracy points the cascade may lose against the deepest exit; the least "
             "expected cost meeting it wins (the default, 0.5).")] = None,
    flops_budget: Annotated[str | None, typer.Option(
        help="Expected FLOPs per sample, e.g. 150M: the best accuracy within it.")] = None,
    latency_budget_ms: Annotated[float | None, typer.Option(
        help="Expected latency per sample (needs `byot-edge profile`): the best accuracy "
             "within it.")] = None,
    max_worst_case: Annotated[float | None, typer.Option(
        help="Also bound a sample that no exit lets go, as a multiple of the deepest exit "
             "alone (e.g. 1.1): limits which exits' branches may run.")] = None,
    criterion: Annotated[str, typer.Option(
        help="max_softmax, entropy, margin, or gate (a logistic gate per exit learned from "
             "this and the earlier exits' softmax).")] = "max_softmax",
    delta: Annotated[float | None, typer.Option(
        help="With --max-drop: the promise holds on new data with probability >= 1 - delta "
             "(Learn-then-Test). Default 0.1.")] = None,
    risk: Annotated[str, typer.Option(
        help="What --max-drop bounds: drop (accuracy points against the deepest exit, needs "
             "labels) or disagreement (points of answers differing from the deepest exit's, "
             "no labels needed; it also bounds the drop).")] = "drop",
    fit_fraction: Annotated[float, typer.Option(
        help="Share of the validation samples that orders the candidates (and fits gates); "
             "the rest certifies them.")] = 0.5,
    point: Annotated[bool, typer.Option(
        "--point", help="The old choice: the cheapest thresholds meeting --max-drop on the "
                        "validation samples themselves, with no guarantee on new data.")
    ] = False,
    temperature: Annotated[bool, typer.Option(
        help="Fit a temperature per exit on the logits first.")] = False,
    backend: Annotated[str | None, typer.Option(
        help="With --data-dir: the backend whose files run (default onnxruntime). Also whose "
             "latency profile gives the costs (default: any; FLOPs without one).")] = None,
    batch: Annotated[int | None, typer.Option(
        help="Price the cascade with the profile at this batch size (default: the smallest "
             "profiled).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write accuracy vs cost curves to this PNG.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Show the choice; leave the manifest alone.")
    ] = False,
    rows: Annotated[int, typer.Option(help="Most frontier rows to print.")] = 20,
) -> None:
    """Choose per-exit confidence thresholds on validation logits and store them: from a
    logits file, or from the deployed files run on the validation split (--data-dir)."""
    from byot_edge.calibrate import calibrate_engine, calibrate_manifest

    at_least(rows, 1, "--rows")
    at_least(batch, 1, "--batch")
    at_least(threads, 1, "--threads")
    output_file(plot, "--plot")
    output_file(save_logits, "--save-logits")
    if not dry_run:
        _manifest_writable(manifest)
    _check_logits_source(logits, data_dir, precision, device, threads, save_logits)
    budget = flops_budget is not None or latency_budget_ms is not None
    if point and delta is not None:
        raise ByotError("--point is the estimate without a guarantee and --delta the "
                        "guarantee's confidence: give one of them")
    guaranteed = not point and not (budget and delta is None)
    common = {"criterion": criterion, "temperature": temperature, "max_drop": max_drop,
              "flops_budget": _flops(flops_budget), "latency_budget_ms": latency_budget_ms,
              "max_worst_case": max_worst_case, "batch": batch, "plot": plot,
              "write": not dry_run, "risk": risk, "fit_fraction": fit_fraction,
              "delta": (0.1 if delta is None else delta) if guaranteed else None}
    with _show_warnings():
        if data_dir is not None:
            from byot_edge.runtime.backends import canonical_backend

            cal = calibrate_engine(manifest, data_dir,
                                   backend=canonical_backend(backend or "onnxruntime"),
                                   precision=precision, device=device, threads=threads,
                                   save_logits=save_logits, **common)
        else:
            cal = calibrate_manifest(manifest, logits, backend=backend, **common)  # type: ignore[arg-type]
    console.print(_calibration_table(cal, rows))
    console.print(_promise(cal))
    if save_logits:
        console.print(f"wrote {save_logits}")
    if dry_run:
        console.print("dry run: the manifest was not changed")
    else:
        console.print(f"wrote thresholds {[round(t, 4) for t in cal.chosen.thresholds]} into "
                      f"{manifest}")
    if plot:
        console.print(f"wrote {plot}")


PRECISIONS = ("fp32", "fp16", "int8")


def _manifest_writable(manifest: Path) -> None:
    """calibrate and profile rewrite the manifest after their work: a folder they cannot
    write is refused before it (a folder that does not exist is load_manifest's to name)."""
    folder = manifest if manifest.is_dir() else manifest.parent
    if folder.is_dir():
        output_folder(folder, f"{manifest}'s folder")


def _check_logits_source(logits: Path | None, data_dir: Path | None, precision: str | None,
                         device: str | None, threads: int | None,
                         save_logits: Path | None) -> None:
    """Exactly one of --logits and --data-dir; the engine's options only with --data-dir."""
    if (logits is None) == (data_dir is None):
        raise ByotError("give exactly one of --logits FILE (validation logits from `byot-edge "
                        "eval --split val --save-logits`) and --data-dir DIR (run the deployed "
                        "files on the validation split)"
                        + (", not both" if logits is not None else ""))
    engine_only = {"--precision": precision, "--device": device, "--threads": threads,
                   "--save-logits": save_logits}
    given = [flag for flag, v in engine_only.items() if v is not None]
    if logits is not None and given:
        raise ByotError(f"{', '.join(given)} only apply with --data-dir (the logits in "
                        f"{logits} were computed already)")
    if precision is not None and precision not in PRECISIONS:
        raise ByotError(f"unknown --precision {precision!r}; choose one of: "
                        f"{', '.join(PRECISIONS)}")


@app.command("profile", epilog=PROFILE_EXAMPLE)
def profile_command(
    manifest: Annotated[Path, typer.Argument(help="manifest.json to store the profile in.")],
    backend: Annotated[str, typer.Option(help="onnxruntime, tensorrt or torch.")] = "onnxruntime",
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    batch: Annotated[str, typer.Option(
        help="Comma-separated batch sizes, e.g. 1,8,32 for a server that batches.")] = "1",
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing.")] = 10,
    runs: Annotated[int, typer.Option(help="Timed runs per file and batch size.")] = 100,
    max_seconds: Annotated[float, typer.Option(
        help="Time for at most this long per file or plan (at least 5 runs each); the "
             "default is quick, 10 gives steadier figures.")] = 1.0,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for onnxruntime/torch (default: theirs).")] = None,
) -> None:
    """Time every truncated exit, segment and span, and every cascade plan through the
    runtime (p50/p90/p99, all taking turns); store them in the manifest.

    A span i-k is segments i..k joined: what the cascade runs when exits i..k-1 are off. A
    plan is the exits that are on ("1,3,4"); calibration prices it as measured."""
    from byot_edge.manifest import load_manifest
    from byot_edge.runtime.backends import get_backend
    from byot_edge.runtime.profile import NOISY, noise, profile_backend, store_profiles

    batches = csv_values(batch, int, "--batch", "comma-separated positive integers like 1,8,32",
                         minimum=1)
    for value, low, option in ((runs, 1, "--runs"), (warmup, 0, "--warmup"),
                               (threads, 1, "--threads")):
        at_least(value, low, option)
    if not max_seconds > 0:
        raise ByotError(f"--max-seconds must be > 0, got {max_seconds}")
    m = load_manifest(manifest)
    _manifest_writable(manifest)
    options = {"threads": threads} if threads else {}
    with get_backend(backend, m, device=device, **options) as be, console.status("profiling") as status:
        profiles = profile_backend(be, batches, warmup=warmup, runs=runs,
                                   max_seconds=max_seconds,
                                   progress=lambda s: status.update(f"profiling {s}"))
    path = store_profiles(m, profiles)
    for p in profiles:
        table = Table("exit", "truncated p50", "p90", "p99", "segment p50", "p90", "p99",
                      "spans p50", title=f"{p.backend} on {p.device}, batch {p.batch} "
                      "(ms per batch)")
        for e in p.exits:
            cells = [f"{st.get(s):.3f}" if st is not None else "-"
                     for st in (e.truncated, e.segment) for s in ("p50", "p90", "p99")]
            spans = " ".join(f"{i}-{e.exit}: {v.p50:.3f}" for i, v in e.spans.items())
            table.add_row(str(e.exit), *cells, spans or "-")
        if p.cascade is not None:
            table.caption = (f"the runtime's cascade through every segment, no early answer: "
                             f"{p.cascade.p50:.3f} ms p50, {p.cascade.p90:.3f} p90; "
                             f"{len(p.plans)} cascade plans timed")
        console.print(table)
    console.print(f"stored {len(profiles)} profile(s) in {path}")
    spread = max(noise(p) for p in profiles)
    if spread > NOISY:
        err_console.print(
            f"[yellow]note:[/] noisy timings: a file's p90 is up to {spread:.1f}x its p50 "
            "(another process shares the CPU?); budgets compare with p50 by default. For "
            "steadier figures profile on an idle machine with --max-seconds 10", highlight=False)
