"""What a training run is: its options (TrainConfig), the recipes, and the rules for
resuming one (which options may change on resume, and how)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from byot_edge.errors import ByotError
from byot_edge.losses import METHODS, LossConfig
from byot_edge.models.backbones import STEMS


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    dataset: str = "cifar10"
    data_dir: str | None = None
    out: str = "runs/byot"
    recipe: str = "quick"
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"  # "cosine" (with warmup) | "multistep"
    milestones: tuple[float, ...] = ()  # multistep: epochs at which lr *= 0.1
    warmup_epochs: float = 0.2
    method: str = "byot"
    alpha: float = 0.3
    temperature: float = 3.0
    feature_weight: float = 0.03
    feature_exits: tuple[int, ...] = (1, 2)
    width: float = 1.0
    stem: str = "cifar"
    image_size: int | None = None  # ImageFolder only
    val_split: float = 0.1
    max_train_samples: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # "auto": bf16 (or fp16 + scaler) on CUDA, off on CPU | bf16 | fp16 | off
    channels_last: bool = False
    compile: bool = False
    cutout: int = 0
    autoaugment: bool = False
    download: bool = False
    log_every: int = 20
    # Fine-tuning: weights for the backbone ("imagenet" or a path; the branches start fresh),
    # the backbone's lr as a fraction of --lr, epochs with the backbone held still (lr 0),
    # and which stage ends carry exits (library backbones; empty: every one).
    pretrained: str | None = None
    backbone_lr: float = 1.0
    freeze_backbone_epochs: float = 0.0
    exits: tuple[str, ...] = ()

    def validate(self) -> TrainConfig:
        """Itself, or a ByotError naming the first option out of range (before any work)."""
        def finite(v: float) -> bool:
            return math.isfinite(v)

        rules: list[tuple[str, bool, str]] = [
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", finite(self.lr) and self.lr > 0, "a number > 0"),
            ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("schedule", self.schedule in ("cosine", "multistep"), "cosine or multistep"),
            ("warmup_epochs", finite(self.warmup_epochs) and self.warmup_epochs >= 0, ">= 0"),
            ("method", self.method in METHODS, " or ".join(METHODS)),
            ("alpha", 0 <= self.alpha <= 1, "in [0, 1]"),
            ("temperature", finite(self.temperature) and self.temperature > 0, "> 0"),
            ("feature_weight", finite(self.feature_weight) and self.feature_weight >= 0,
             ">= 0"),
            ("width", finite(self.width) and 0 < self.width <= 4, "in (0, 4]"),
            ("stem", self.stem in STEMS, " or ".join(STEMS)),
            ("image_size", self.image_size is None or self.image_size >= 8, ">= 8 pixels"),
            ("val_split", 0 <= self.val_split < 1, "in [0, 1)"),
            ("max_train_samples", self.max_train_samples is None or self.max_train_samples >= 1,
             ">= 1 (leave it out for the whole training set)"),
            ("amp", self.amp in ("auto", "bf16", "fp16", "off"), "auto, bf16, fp16 or off"),
            ("cutout", self.cutout >= 0, ">= 0 (0: off)"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("backbone_lr", finite(self.backbone_lr) and 0 <= self.backbone_lr <= 1,
             "in [0, 1] (a fraction of --lr)"),
            ("freeze_backbone_epochs", finite(self.freeze_backbone_epochs)
             and 0 <= self.freeze_backbone_epochs < self.epochs, "in [0, --epochs)"),
        ]
        for name, ok, want in rules:
            if not ok:
                got = shown(getattr(self, name))
                raise ByotError(f"{_option(name)} must be {want}, got {got}")
        try:
            torch.device(self.device if self.device != "auto" else "cpu")
        except RuntimeError:
            raise ByotError(f"--device {self.device!r} is not a device; use auto, cpu, cuda or "
                            "cuda:N") from None
        return self

    def loss_config(self) -> LossConfig:
        return LossConfig(self.method, self.alpha, self.temperature, self.feature_weight,
                          tuple(self.feature_exits))


# Named recipes fill in what the user did not set (cli passes only the options given).
RECIPES: dict[str, dict[str, Any]] = {
    # The paper's CIFAR schedule: SGD lr 0.1, batch 128, 250 epochs, lr /10 at 1/3, 2/3
    # and 10 epochs before the end.
    "paper": {"epochs": 250, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
              "weight_decay": 5e-4, "nesterov": False, "schedule": "multistep",
              "warmup_epochs": 0.0},
    # A few epochs of cosine with warm-up: what a CPU can afford.
    "quick": {"epochs": 4, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
              "weight_decay": 5e-4, "nesterov": True, "schedule": "cosine",
              "warmup_epochs": 0.2},
    # From pretrained weights (--pretrained): the new branches learn at lr, the backbone at
    # a tenth of it, after half an epoch of warm-up; a smaller batch, as on a few thousand
    # images. Weight decay is lighter: it would pull the pretrained weights toward zero.
    "finetune": {"epochs": 5, "batch_size": 64, "lr": 0.05, "momentum": 0.9,
                 "weight_decay": 1e-4, "nesterov": True, "schedule": "cosine",
                 "warmup_epochs": 0.5, "backbone_lr": 0.1},
}


def config_from_recipe(recipe: str, **overrides: Any) -> TrainConfig:
    if recipe not in RECIPES:
        raise ByotError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    cfg = TrainConfig(**{**RECIPES[recipe], **overrides, "recipe": recipe}).validate()
    if cfg.schedule == "multistep" and not cfg.milestones:
        e = cfg.epochs
        cfg = replace(cfg, milestones=(e / 3, 2 * e / 3, max(e - 10, 2 * e / 3)))
    return cfg


# On resume, what a run trains is its checkpoint's; options given again must match it. These
# say where and how fast it runs, not what it learns, and may differ freely:
RESUME_FREE = frozenset({"out", "data_dir", "device", "download", "compile", "channels_last",
                         "log_every"})
# These may change with `override` (--override): the optimiser and the loss take them anew,
# e.g. a lower lr after a divergence. The rest (the network, the data split, the batch, the
# schedule, the seed) would make a different run: start one with another --out.
RESUME_OVERRIDABLE = frozenset({"lr", "weight_decay", "amp", "method", "alpha", "temperature",
                                "feature_weight", "feature_exits", "backbone_lr"})
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value: Any) -> str:
    """A value as it is typed on the command line."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def resume_config(state: Mapping[str, Any], given: Mapping[str, Any], *,
                  override: bool = False, source: str | Path = "the checkpoint") -> TrainConfig:
    """The configuration a run resumes with: the checkpoint's, with `given` (options the
    user set again, by TrainConfig field name) checked against it. `epochs` may grow (to
    extend a run); RESUME_FREE ones may differ; RESUME_OVERRIDABLE ones only with `override`;
    any other difference is refused with a ByotError naming the option and its value."""
    if not all(k in state for k in ("train_config", "optimizer", "scheduler", "rng")):
        raise ByotError(f"{source} holds weights only (no optimizer and data-order state), so "
                        "it cannot be resumed; resume from RUN/last.pt written by "
                        "`byot-edge train`")
    known = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**_tuples({k: v for k, v in state["train_config"].items()
                                   if k in known}))
    changes: dict[str, Any] = {}
    for name, value in given.items():
        if name not in known:
            raise ByotError(f"unknown training option {name!r}")
        old = getattr(saved, name)
        value = tuple(value) if isinstance(value, list) else value
        allowed = (name in RESUME_FREE or name == "epochs" or value == old
                   or (override and name in RESUME_OVERRIDABLE))
        if not allowed:
            opt, new = f"{_option(name)} {shown(value)}", f"{_option(name)} {shown(old)}"
            how = (f"add --override to resume with {opt}" if name in RESUME_OVERRIDABLE else
                   f"it cannot change on resume: start a new run with another --out to "
                   f"train with {opt}")
            raise ByotError(f"{opt} differs from the run being resumed, which has {new} "
                            f"({source}); a resumed run keeps its settings: leave "
                            f"{_option(name)} out, or {how}")
        changes[name] = value
    cfg = replace(saved, **changes)
    done = int(state.get("epoch", 0))
    if cfg.epochs <= done:
        raise ByotError(f"{source} already finished epoch {done} of the run's {saved.epochs}; "
                        f"pass --epochs N with N > {done} to train it further")
    return cfg


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints store tuples as lists; TrainConfig wants them back as tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
