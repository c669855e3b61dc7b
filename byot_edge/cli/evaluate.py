"""`byot-edge eval` and `byot-edge models`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from byot_edge.cli.app import app, at_least, console, output_file, torch_device
from byot_edge.errors import ByotError

EXAMPLE = """
Examples:

  byot-edge eval runs/fmnist/best.pt --data-dir /usr/share/datasets/fashion-mnist

  byot-edge eval runs/r18/best.pt --data-dir data/cifar10 --split val --save-logits runs/r18/val_logits.npz --json runs/r18/eval.json
"""


@app.command("eval", epilog=EXAMPLE)
def evaluate_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `byot-edge train`.")],
    data_dir: Annotated[Path | None, typer.Option(help="The dataset's folder.")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Dataset name (default: the one the checkpoint was trained on).")] = None,
    split: Annotated[str, typer.Option(
        help="test, or val (the held-out part of the training set, for calibration).")] = "test",
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 256,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the table as JSON.")
    ] = None,
    save_logits: Annotated[Path | None, typer.Option(
        help="Save every exit's logits and the labels (.npz) for `byot-edge calibrate`.")] = None,
) -> None:
    """Per-exit top-1/top-5, parameters and FLOPs of each exit's path, and the ensemble."""
    from byot_edge.checkpoint import load_model
    from byot_edge.evaluate import evaluate
    from byot_edge.evaluate import save_logits as write_logits
    from byot_edge.fileio import atomic_write_json
    from byot_edge.train import eval_split

    if split not in ("test", "val"):
        raise ByotError(f"--split {split!r} is not a split; choose test or val")
    at_least(batch_size, 1, "--batch-size")
    output_file(json_out, "--json")
    output_file(save_logits, "--save-logits")
    model, state = load_model(checkpoint, torch_device(device))
    data, info = eval_split(state, split, dataset=dataset, data_dir=data_dir)
    result = evaluate(model, data, info, split=split, batch_size=batch_size, device=device)
    table = Table("exit", "top-1", "top-5", "params", "MFLOPs",
                  title=f"{checkpoint} on {info.name} ({split}, {len(result.labels)} images)")
    for r in result.rows:
        table.add_row(r.name, f"{r.top1:.2%}", f"{r.top5:.2%}" if r.top5 is not None else "-",
                      f"{r.params:,}" if r.params else "-",
                      f"{r.flops / 1e6:,.1f}" if r.flops else "-")
    console.print(table)
    if json_out:
        atomic_write_json(json_out, {"checkpoint": str(checkpoint), **result.to_dict()})
        console.print(f"wrote {json_out}")
    if save_logits:
        write_logits(save_logits, result)
        console.print(f"wrote {save_logits} (logits of {result.logits.shape[0]} exits)")


@app.command("models")
def models_command() -> None:
    """List the architectures that `--arch` accepts."""
    from byot_edge.models import list_models

    for name in list_models():
        console.print(name)
