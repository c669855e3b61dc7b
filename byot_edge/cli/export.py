"""`byot-edge export`: checkpoint -> checked ONNX files (+ TensorRT engines) + manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from byot_edge.cli.app import app, console, csv_values, output_file, output_folder

_EXAMPLE = (
    "Example: byot-edge export runs/cifar/best.pt --exit all --segments --out deploy/  "
    "(then: --format trt --precision fp16 --batch-range 1,8,32 on the target device; or, for "
    "ONNX Runtime on a CPU: --precision int8 --data-dir DATA --calibration-images 512)"
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
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `byot-edge train`.")],
    exit_: Annotated[str, typer.Option(
        "--exit", help="Exit to export: 1..K, a list (1,3) or all.")] = "all",
    out: Annotated[Path, typer.Option(help="Output folder (manifest + files).")] = Path("deploy"),
    segments: Annotated[bool, typer.Option(
        help="Also write segment1..K for cascaded (anytime) serving.")] = False,
    fmt: Annotated[str, typer.Option(
        "--format", help="onnx, trt (ONNX + engines) or all.")] = "onnx",
    batch: Annotated[int | None, typer.Option(
        help="Static batch size (default: a dynamic batch axis).")] = None,
    batch_range: Annotated[str | None, typer.Option(
        help="TensorRT profile min,opt,max (default 1,8,32).")] = None,
    precision: Annotated[str, typer.Option(
        help="fp32; int8 (ONNX files for ONNX Runtime on the CPU, or with --format trt the "
             "engines); fp16 (engines).")] = "fp32",
    calibration_images: Annotated[int | None, typer.Option(
        help="int8: how many training images to calibrate on (default 512).")] = None,
    int8_agreement: Annotated[float | None, typer.Option(
        help="int8: least top-1 agreement with PyTorch each file must reach (default 0.9).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="Real images for the checks and int8 calibration.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Dataset in --data-dir (default: the checkpoint's).")] = None,
    rtol: Annotated[float, typer.Option(help="Max error relative to the largest logit.")] = 1e-4,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default 18).")] = None,
    exporter: Annotated[str, typer.Option(
        help="auto (torch.export, else TorchScript), dynamo, torchscript.")] = "auto",
    workspace_mb: Annotated[int, typer.Option(help="TensorRT workspace limit.")] = 1024,
    timing_cache: Annotated[Path | None, typer.Option(
        help="TensorRT timing cache (default OUT/timing.cache).")] = None,
    compute_capability: Annotated[str | None, typer.Option(
        help="TensorRT-RTX: build ahead of time for this GPU generation (e.g. 8.9), no GPU "
             "needed.")] = None,
) -> None:
    from byot_edge.export.exporter import export_checkpoint
    from byot_edge.export.trt_build import TrtOptions

    output_folder(out, "--out")
    output_file(timing_cache, "--timing-cache")
    formats = ("onnx", "trt") if fmt == "all" else (fmt,)
    trt = TrtOptions(precision=precision, batch_range=_parse_range(batch_range),
                     workspace_mb=workspace_mb, timing_cache=timing_cache,
                     compute_capability=compute_capability)
    dropped: list[str] = []  # what the folder held that no longer applies: said at the end
    with console.status("exporting") as status:
        manifest, reports = export_checkpoint(
            checkpoint, out, exits=_parse_exits(exit_), segments=segments, formats=formats,
            batch=batch, data_dir=data_dir, dataset=dataset, rtol=rtol, opset=opset,
            trt_options=trt, progress=lambda msg: status.update(msg), exporter=exporter,  # type: ignore[arg-type]
            precision=precision, calibration_images=calibration_images,
            int8_agreement=int8_agreement, notes=dropped.append,
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
    int8 = [r for r in reports if r.min_agreement is not None]
    if int8:
        console.print(f"int8 files: passed when top-1 agreement with PyTorch >= "
                      f"{int8[0].min_agreement:.0%} on {int8[0].samples} held-out images; their "
                      "logits error is reported, not judged", highlight=False)
    for note in dict.fromkeys([*(r.note for r in reports if r.note), *dropped]):  # once each
        console.print(f"note: {note}", highlight=False)
    console.print(f"wrote {out / 'manifest.json'}: {manifest.model['arch']}, "
                  f"{manifest.num_exits} exits", highlight=False)
