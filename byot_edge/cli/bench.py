"""`byot-edge bench`: latency per exit and backend, throughput, accuracy, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from byot_edge.cli.app import app, at_least, console, csv_values, output_folder
from byot_edge.errors import ByotError

EXAMPLE = """
Examples:

  byot-edge bench deploy/manifest.json --backend onnxruntime,torch --batch 1,8,32

  byot-edge bench deploy/manifest.json --backend onnxruntime --data-dir /usr/share/datasets/fashion-mnist --out bench/
"""


@app.command(epilog=EXAMPLE)
def bench(
    manifest: Annotated[Path, typer.Argument(help="deploy/manifest.json written by export.")],
    backend: Annotated[str, typer.Option(
        help="Comma-separated: onnxruntime, torch, tensorrt. Unavailable ones are skipped.")
    ] = "onnxruntime",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8,32",
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="Test data of the manifest's dataset: adds accuracy per exit and of the cascade.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Test images used for accuracy.")] = 1000,
    eval_batch: Annotated[int, typer.Option(help="Batch size of the accuracy pass.")] = 1,
    runs: Annotated[int, typer.Option(help="Timed runs per artifact (at most).")] = 100,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per artifact.")] = 10,
    max_seconds: Annotated[float, typer.Option(
        help="Stop timing an artifact after this long (after 5 runs at least).")] = 5.0,
    out: Annotated[Path, typer.Option(help="Folder for bench.json, CSVs and PNG plots.")
    ] = Path("bench"),
) -> None:
    """Measure every exit and segment on every backend: p50/p90/p99, images/s, GFLOP/s;
    with --data-dir also accuracy of each exit and of the threshold cascade."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from byot_edge.bench import run_bench, write_report

    batches = csv_values(batch, int, "--batch", "comma-separated positive integers like 1,8,32",
                         minimum=1)
    output_folder(out, "--out")
    for value, low, option in ((limit, 1, "--limit"), (eval_batch, 1, "--eval-batch"),
                               (runs, 1, "--runs"), (warmup, 0, "--warmup")):
        at_least(value, low, option)
    if not max_seconds > 0:
        raise ByotError(f"--max-seconds must be > 0, got {max_seconds}")
    backends = [b.strip() for b in backend.split(",") if b.strip()]
    known = ("onnxruntime", "torch", "tensorrt")
    if not backends or set(backends) - set(known):
        raise ByotError(f"--backend {backend!r}: choose from {', '.join(known)}, "
                        "comma-separated")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("starting")
        report = run_bench(manifest, backends, batches, device=device, data_dir=data_dir, limit=limit,
                           eval_batch=eval_batch, warmup=warmup, runs=runs,
                           max_seconds=max_seconds,
                           progress=lambda msg: progress.update(task, description=msg))
    table = Table("backend", "batch", "artifact", "p50 ms", "p90 ms", "p99 ms", "img/s",
                  "GFLOP/s", title=f"{report.model} on {report.machine['cpu']}")
    for r in report.latency:
        table.add_row(r.backend, str(r.batch), r.artifact, f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}",
                      f"{r.p99_ms:.3f}", f"{r.images_per_s:,.0f}",
                      f"{r.gflops_per_s:.1f}" if r.gflops_per_s else "-")
    console.print(table)
    if report.accuracy:
        acc = Table("backend", "answer", "top-1", "ms/image", "mean exit", "share per exit",
                    title="accuracy on the test split")
        for a in report.accuracy:
            acc.add_row(a.backend, a.what, f"{a.accuracy:.2%}", f"{a.ms_per_image:.3f}",
                        f"{a.mean_exit:.2f}", " ".join(f"{s:.0%}" for s in a.exit_share))
        console.print(acc)
    for name, why in report.skipped.items():
        console.print(f"[yellow]skipped {name}:[/] {escape(why)}")
    if report.power:
        console.print(f"power (tegrastats): {report.power}")
    written = write_report(report, out)
    for path in written:
        console.print(f"wrote {path}")
    if not any(p.suffix == ".png" for p in written):
        console.print("no PNG plots: matplotlib is not installed (pip install "
                      "'byot-edge[plot]')", highlight=False)
