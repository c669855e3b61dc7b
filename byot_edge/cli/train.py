"""`byot-edge train`: parse options, call `byot_edge.train.train`, show progress."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from byot_edge.cli.app import app, console, csv_values, output_folder
from byot_edge.errors import ByotError

EXAMPLE = """
Examples:

  byot-edge train --dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --width 0.25 --recipe quick --out runs/fmnist

  byot-edge train --arch resnet18 --dataset cifar10 --data-dir data/cifar10 --recipe paper --amp auto --channels-last --out runs/r18

  byot-edge train --resume runs/r18/last.pt --out runs/r18

  byot-edge train --arch tv:mobilenet_v3_large --pretrained imagenet --recipe finetune --dataset imagefolder --data-dir photos --image-size 224 --out runs/photos

  torchrun --nproc-per-node 4 -m byot_edge.cli train --arch resnet18 --dataset cifar10 --data-dir data/cifar10 --recipe paper --out runs/r18-ddp
"""


class ProgressReporter:
    """Progress bar with the loss parts and throughput, and a per-epoch table of exits."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[parts]}"), TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(), console=console, transient=True,
        )
        self.table: Table | None = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, epoch=f"{epoch}/{epochs}",
                                           parts="", speed="")

    def update(self, step: int, parts: dict[str, float], images_per_s: float) -> None:
        text = " ".join(f"{k} {v:.3f}" for k, v in parts.items())
        self.progress.update(self.task, completed=step, parts=text,
                             speed=f"{images_per_s:,.0f} img/s")

    def note(self, text: str) -> None:
        console.print(text)

    def end_epoch(self, log: Any) -> None:
        self.progress.stop()
        self.progress.remove_task(self.task)
        if self.table is None:
            self.table = Table("epoch", "lr", "loss",
                               *(f"exit {k}" for k in range(1, len(log.val_accuracy) + 1)),
                               "ensemble", "img/s", title="validation top-1 per exit")
        self.table.add_row(str(log.epoch), f"{log.lr:.4f}", f"{log.loss['loss']:.3f}",
                           *(f"{a:.2%}" for a in log.val_accuracy), f"{log.val_ensemble:.2%}",
                           f"{log.images_per_s:,.0f}")
        console.print(f"epoch {log.epoch}: " + "  ".join(
            f"exit {k} {a:.2%}" for k, a in enumerate(log.val_accuracy, 1))
            + f"  ensemble {log.val_ensemble:.2%}  ({log.seconds:.1f}s, "
              f"{log.images_per_s:,.0f} img/s)")


@app.command(epilog=EXAMPLE)
def train(
    ctx: typer.Context,
    arch: Annotated[str, typer.Option(help="Architecture; see `byot-edge models`.")] = "resnet18",
    dataset: Annotated[str, typer.Option(
        help="cifar10, cifar100, mnist, fashion-mnist, imagefolder or synthetic.")] = "cifar10",
    data_dir: Annotated[Path | None, typer.Option(
        help="Folder with the dataset (e.g. holding cifar-10-batches-py).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder for checkpoints and metrics.")] = Path(
        "runs/byot"),
    recipe: Annotated[str, typer.Option(
        help="quick (a few cosine epochs, for CPUs), paper (250 epochs, multistep) or "
             "finetune (from --pretrained: the backbone at a tenth of --lr).")] = "quick",
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the recipe's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="SGD weight decay.")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine or multistep.")] = None,
    method: Annotated[str, typer.Option(
        help="byot (self-distillation), dsn (CE on every exit) or plain (deepest exit only).")
    ] = "byot",
    alpha: Annotated[float, typer.Option(help="Weight of the KL term (BYOT).")] = 0.3,
    temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = 3.0,
    feature_weight: Annotated[float, typer.Option(help="Weight lambda of the feature loss.")] = 0.03,
    feature_exits: Annotated[str, typer.Option(
        help="Exits whose features are pulled to the deepest's, comma-separated.")] = "1,2",
    width: Annotated[float, typer.Option(help="Channel width multiplier (0.25 for CPUs).")] = 1.0,
    stem: Annotated[str, typer.Option(help="cifar (3x3, stride 1) or imagenet (7x7 + pool).")
    ] = "cifar",
    image_size: Annotated[int | None, typer.Option(help="Resize ImageFolder images to this.")
    ] = None,
    val_split: Annotated[float, typer.Option(
        help="Fraction of the training set held out for validation and calibration.")] = 0.1,
    max_train_samples: Annotated[int | None, typer.Option(
        help="Train on the first N training images only (quick runs).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for init, data order and augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    amp: Annotated[str, typer.Option(help="auto, bf16, fp16 or off.")] = "auto",
    channels_last: Annotated[bool, typer.Option(help="Channels-last memory format.")] = False,
    compile: Annotated[bool, typer.Option(help="torch.compile the training step.")] = False,
    cutout: Annotated[int, typer.Option(help="Cutout square size (0: off).")] = 0,
    autoaugment: Annotated[bool, typer.Option(help="AutoAugment (CIFAR policy).")] = False,
    download: Annotated[bool, typer.Option(help="Download with torchvision (needs internet).")
    ] = False,
    pretrained: Annotated[str | None, typer.Option(
        help="Backbone weights: imagenet (the library's, downloaded to its cache), or a file: "
             "a state dict of the plain backbone, or a byot-edge checkpoint. The exit "
             "branches and the classifier start fresh.")] = None,
    backbone_lr: Annotated[float | None, typer.Option(
        help="The backbone's learning rate as a fraction of --lr (default: the recipe's; "
             "finetune 0.1, others 1).")] = None,
    freeze_backbone_epochs: Annotated[float, typer.Option(
        help="Epochs at the start with the backbone held still (lr 0): the new branches "
             "learn first.")] = 0.0,
    exits: Annotated[str, typer.Option(
        help="Library backbones: the stage ends that get an exit, comma-separated, ending "
             "with the deepest (`byot-edge models ARCH` lists them; default: all).")] = "",
    threads: Annotated[int | None, typer.Option(help="CPU threads for PyTorch.")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue from RUN/last.pt with its own settings; options given again must "
             "match them, but --epochs may grow (default --out: the checkpoint's folder).")
    ] = None,
    override: Annotated[bool, typer.Option(
        help="With --resume: let --lr, --weight-decay, --amp, --method, --alpha, "
             "--temperature, --feature-weight and --feature-exits replace the run's values "
             "(e.g. a lower --lr after a divergence).")] = False,
) -> None:
    """Train a multi-exit network with self-distillation (or a baseline method)."""
    import torch

    from byot_edge.checkpoint import load_checkpoint
    from byot_edge.train import train as run_training
    from byot_edge.train_config import config_from_recipe, resume_config

    if threads is not None:
        if threads < 1:
            raise ByotError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    values = {"arch": arch, "dataset": dataset, "data_dir": str(data_dir) if data_dir else None,
              "out": str(out), "recipe": recipe, "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "weight_decay": weight_decay, "schedule": schedule, "method": method,
              "alpha": alpha, "temperature": temperature, "feature_weight": feature_weight,
              "feature_exits": tuple(csv_values(
                  feature_exits, int, "--feature-exits",
                  "comma-separated exit numbers like 1,2", empty_ok=True)), "width": width, "stem": stem,
              "image_size": image_size, "val_split": val_split,
              "max_train_samples": max_train_samples, "seed": seed, "device": device,
              "amp": amp, "channels_last": channels_last, "compile": compile, "cutout": cutout,
              "autoaugment": autoaugment, "download": download, "pretrained": pretrained,
              "backbone_lr": backbone_lr, "freeze_backbone_epochs": freeze_backbone_epochs,
              "exits": tuple(e.strip() for e in exits.split(",") if e.strip())}
    if resume is None:
        if override:
            raise ByotError("--override only applies with --resume RUN/last.pt")
        from_recipe = ("epochs", "batch_size", "lr", "weight_decay", "schedule", "backbone_lr")
        cfg = config_from_recipe(**{k: v for k, v in values.items()
                                    if not (k in from_recipe and v is None)})
    else:
        # Only what was typed counts: a default must not replace the run's own value.
        typed = {k: v for k, v in values.items()
                 if ctx.get_parameter_source(k).name in ("COMMANDLINE", "ENVIRONMENT")}
        typed.setdefault("out", str(resume.parent))
        cfg = resume_config(load_checkpoint(resume), typed, override=override, source=resume)
    output_folder(Path(cfg.out), "--out")
    run = run_training(cfg, resume=resume, reporter=ProgressReporter())
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    console.print(f"checkpoints: {run / 'best.pt'} (best deepest exit), {run / 'last.pt'}; "
                  f"metrics: {run / 'metrics.jsonl'}")
