"""`byot-edge export`: checkpoint -> checked ONNX files (+ TensorRT engines) + manifest."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from byot_edge.cli.app import app, console, csv_values, output_folder

_EXAMPLE = (
    "Example: byot-edge export runs/cifar/best.pt --exit all --segments --out deploy/  "
    "(then: --format trt --precision fp16 --batch-range 1,8,32 on the target device)"
)


def _parse_exits(value: str) -> list[int] | None:
    if value.strip().lower() == "all":
        return None
    return csv_values(value, int, "--exit", "an exit number (1..K), a list like 1,3, or 'all'")


def _parse_range(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    lo, opt, hi = csv_values(value, int, "--batch-range", "min,opt,max (e.g. 1,8,32)", count=3)
    return lo, opt, hi


@app.command(help="Export exits of a checkpoint to ONNX (and TensorRT), checked against "
                  "PyTorch, with a manifest for the runtime.\n\n" + _EXAMPLE)
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `byot-edge train`."),
    exit_: str = typer.Option("all", "--exit", help="Exit to export: 1..K, a list (1,3) or all."),
    out: Path = typer.Option(Path("deploy"), "--out", help="Output folder (manifest + files)."),
    segments: bool = typer.Option(False, "--segments",
                                  help="Also write segment1..K for cascaded (anytime) serving."),
    fmt: str = typer.Option("onnx", "--format", help="onnx, trt (ONNX + engines) or all."),
    batch: int | None = typer.Option(None, "--batch",
                                     help="Static batch size (default: a dynamic batch axis)."),
    batch_range: str | None = typer.Option(None, "--batch-range",
                                           help="TensorRT profile min,opt,max (default 1,8,32)."),
    precision: str = typer.Option("fp32", "--precision", help="Engines: fp32, fp16 or int8."),
    data_dir: Path | None = typer.Option(None, "--data-dir",
                                         help="Real images for the checks and int8 calibration."),
    dataset: str | None = typer.Option(None, "--dataset",
                                       help="Dataset in --data-dir (default: the checkpoint's)."),
    rtol: float = typer.Option(1e-4, "--rtol", help="Max error relative to the largest logit."),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default 18)."),
    exporter: str = typer.Option("auto", "--exporter",
                                 help="auto (torch.export, else TorchScript), dynamo, torchscript."),
    workspace_mb: int = typer.Option(1024, "--workspace-mb", help="TensorRT workspace limit."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache",
                                             help="TensorRT timing cache (default OUT/timing.cache)."),
    compute_capability: str | None = typer.Option(
        None, "--compute-capability",
        help="TensorRT-RTX: build ahead of time for this GPU generation (e.g. 8.9), no GPU needed."),
) -> None:
    from byot_edge.export.exporter import export_checkpoint
    from byot_edge.export.trt_build import TrtOptions

    output_folder(out, "--out")
    formats = ("onnx", "trt") if fmt == "all" else (fmt,)
    trt = TrtOptions(precision=precision, batch_range=_parse_range(batch_range),
                     workspace_mb=workspace_mb, timing_cache=timing_cache,
                     compute_capability=compute_capability)
    with console.status("exporting") as status:
        manifest, reports = export_checkpoint(
            checkpoint, out, exits=_parse_exits(exit_), segments=segments, formats=formats,
            batch=batch, data_dir=data_dir, dataset=dataset, rtol=rtol, opset=opset,
            trt_options=trt, progress=lambda msg: status.update(msg), exporter=exporter,  # type: ignore[arg-type]
        )
    table = Table(title=f"checks: {out}")
    table.add_column("file", no_wrap=True)
    table.add_column("exit", justify="right", min_width=4)
    table.add_column("checked by", no_wrap=True)
    for col in ("abs err", "rel err", "top-1"):
        table.add_column(col, justify="right", min_width=7)
    table.add_column("result", min_width=6)
    for r in reports:
        table.add_row(
            r.file, str(r.exit), r.backend,
            "" if r.max_abs is None else f"{r.max_abs:.1e}",
            "" if r.max_rel is None else f"{r.max_rel:.1e}",
            "" if r.top1_agreement is None else f"{r.top1_agreement:.0%}",
            "[green]ok[/]" if r.passed else "[red]FAILED[/]",
        )
    console.print(table)
    for note in dict.fromkeys(r.note for r in reports if r.note):  # once each, in order
        console.print(f"note: {note}", highlight=False)
    console.print(f"wrote {out / 'manifest.json'}: {manifest.model['arch']}, "
                  f"{manifest.num_exits} exits", highlight=False)
