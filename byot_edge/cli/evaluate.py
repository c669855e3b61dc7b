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


MODELS_EXAMPLE = """
Examples:

  byot-edge models

  byot-edge models 'tv:*'

  byot-edge models 'timm:mobilenetv4*'

  byot-edge models tv:resnet50
"""


@app.command("models", epilog=MODELS_EXAMPLE)
def models_command(
    pattern: Annotated[str | None, typer.Argument(
        help="Shell-style pattern (tv:*, timm:*mobilenet*), or one architecture to show its "
             "stage ends (what --exits names).")] = None,
) -> None:
    """List the architectures that `--arch` accepts: the hand-cut ones, torchvision's CNN
    families (tv:NAME) and, with byot-edge[timm] installed, timm's (timm:NAME)."""
    from byot_edge.extras import available
    from byot_edge.models import create_model, list_models
    from byot_edge.models.library import LIBRARIES, is_library_arch, library_names

    if pattern and not any(ch in pattern for ch in "*?[") and (
            is_library_arch(pattern) or pattern in list_models()):
        model = create_model(pattern, num_classes=1000, input_size=224, stem="imagenet")
        table = Table("exit", "stage end", "channels", "stride", "MFLOPs at 224 px",
                      title=f"{pattern}: where its exits sit (default: all)")
        for e in model.exits:
            table.add_row(str(e.index), e.stage, str(e.channels), str(e.stride),
                          f"{e.flops / 1e6:,.0f}")
        console.print(table)
        return
    lib, _, rest = (pattern or "").partition(":")
    if pattern is None or lib not in LIBRARIES:
        import fnmatch

        for name in list_models():
            if pattern is None or fnmatch.fnmatch(name, pattern):
                console.print(name)
        if pattern is not None:
            return
        console.print(f"tv:NAME   {len(library_names('tv'))} torchvision CNNs "
                      "(`byot-edge models 'tv:*'`)")
        if available("timm"):
            console.print(f"timm:NAME {len(library_names('timm'))} timm CNNs "
                          "(`byot-edge models 'timm:*'`)")
        else:
            console.print("timm:NAME timm's CNNs, with pip install 'byot-edge[timm]'")
        return
    names = library_names(lib, rest or "*")
    if not names:
        raise ByotError(f"no {lib} architecture matches {pattern!r}; try `byot-edge models "
                        f"'{lib}:*'`")
    for name in names:
        console.print(name)
