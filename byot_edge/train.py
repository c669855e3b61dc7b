"""The training loop: short and in order, fast on purpose (nanoGPT/airbench style).

Data live on the device as uint8 and are augmented there; loss parts are summed on the
device and read back only every `log_every` steps (no host sync per step). Checkpoints are
written atomically at the end of each epoch: `last.pt` always, `best.pt` when the deepest
exit's validation accuracy improves. Under torchrun the same function runs DDP.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from byot_edge.checkpoint import load_checkpoint, save_checkpoint
from byot_edge.data import Batches
from byot_edge.datasets import Arrays, dataset_info, load_arrays, train_val_split
from byot_edge.errors import ByotError
from byot_edge.evaluate import accuracy_rows, predict_logits
from byot_edge.fileio import atomic_write_bytes, remove_stale_temps
from byot_edge.losses import METHODS, LossConfig, multi_exit_loss
from byot_edge.models import create_model
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
        ]
        for name, ok, want in rules:
            if not ok:
                got = _shown(getattr(self, name))
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
                                "feature_weight", "feature_exits"})
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
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
            opt, new = f"{_option(name)} {_shown(value)}", f"{_option(name)} {_shown(old)}"
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


@dataclass
class EpochLog:
    epoch: int
    lr: float
    loss: dict[str, float]
    val_accuracy: list[float]  # per exit, 1..K
    val_ensemble: float
    images_per_s: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ByotError("--device cuda was asked for but PyTorch sees no CUDA GPU; "
                            "use --device cpu, or install a CUDA build of PyTorch")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if amp == "auto":
        return torch.float16
    raise ByotError(f"unknown --amp {amp!r}; choose auto, bf16, fp16 or off")


def _lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    warm = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
        if cfg.schedule == "multistep":
            epoch = step / steps_per_epoch
            return 0.1 ** sum(epoch >= m for m in cfg.milestones)
        raise ByotError(f"unknown schedule {cfg.schedule!r}; choose cosine or multistep")

    return factor


def _load_data(cfg: TrainConfig) -> tuple[Arrays, Arrays, str]:
    """Training and validation arrays; the validation split is held out of the training set."""
    train = load_arrays(cfg.dataset, cfg.data_dir, "train", cfg.image_size, cfg.download)
    if cfg.val_split > 0:
        train_idx, val_idx = train_val_split(len(train.labels), cfg.val_split, cfg.seed)
        val, train, val_name = train.subset(val_idx), train.subset(train_idx), "val"
    else:
        val, val_name = load_arrays(cfg.dataset, cfg.data_dir, "test", cfg.image_size), "test"
    if cfg.max_train_samples:
        train = train.subset(np.arange(min(cfg.max_train_samples, len(train.labels))))
    return train, val, val_name


class Diverged(ByotError):
    pass


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  loss_cfg: LossConfig, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """One SGD step; returns (total, ce, kd, feat) as a device tensor, never read back here."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(x)
    loss, parts = multi_exit_loss(outputs, y, loss_cfg)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return torch.stack([loss.detach(), parts["ce"], parts["kd"], parts["feat"]])


def train(cfg: TrainConfig, *, resume: str | Path | None = None,
          reporter: Any | None = None) -> Path:
    """Train to `cfg.epochs`; returns the run folder (with last.pt, best.pt, metrics.jsonl).

    `reporter` receives progress (see `cli/train.py`); None trains silently.
    """
    state = load_checkpoint(resume) if resume else None
    if state is not None:
        # `cfg` is taken whole; it must be the run's own but for what resume_config allows.
        given = asdict(cfg)
        given["data_dir"] = cfg.data_dir or state["train_config"].get("data_dir")
        cfg = resume_config(state, given, override=True, source=resume)
    cfg.validate()
    device = _pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = _setup_distributed(device)
    amp_dtype = amp_dtype_for(cfg.amp, device)
    loss_cfg = cfg.loss_config()
    info = dataset_info(cfg.dataset, cfg.image_size)
    torch.manual_seed(cfg.seed)
    train_arrays, val_arrays, val_name = _load_data(cfg)
    num_classes = len(train_arrays.class_names)

    model = create_model(cfg.arch, num_classes=num_classes, in_chans=info.in_chans,
                         input_size=info.input_size, stem=cfg.stem, width=cfg.width)
    bad = [k for k in cfg.feature_exits if not 1 <= k < model.num_exits]
    if bad:
        raise ByotError(f"--feature-exits {_shown(tuple(bad))}: only shallow exits "
                        f"1..{model.num_exits - 1} have features to pull to the deepest's")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = Batches(torch.from_numpy(train_arrays.images).to(device),
                      torch.from_numpy(train_arrays.labels).to(device), info,
                      batch_size=cfg.batch_size // dist.world, train=True, generator=generator,
                      cutout=cfg.cutout, autoaugment=cfg.autoaugment,
                      channels_last=cfg.channels_last, shard=(dist.rank, dist.world))
    val_batches = Batches(torch.from_numpy(val_arrays.images).to(device),
                          torch.from_numpy(val_arrays.labels).to(device), info,
                          batch_size=512, train=False, channels_last=cfg.channels_last)
    if len(batches) == 0:
        raise ByotError(f"{len(train_arrays.labels)} training images make no full batch of "
                        f"{cfg.batch_size}; lower --batch-size or use more data")

    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, len(batches)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, best = 0, -1.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _apply_optimizer_config(optimizer, scheduler, cfg, len(batches))
        if scaler.is_enabled() and state["scaler"]:  # empty when saved without fp16
            scaler.load_state_dict(state["scaler"])
        generator.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, best = state["epoch"], state["metrics"].get("best", -1.0)

    step_model: nn.Module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.method == "plain")
    if cfg.compile:
        step_model = torch.compile(step_model)

    out = Path(cfg.out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out, RUN_FILES)  # left by a run killed while writing
        _start_metrics(out / "metrics.jsonl", start_epoch)
    last_good = (Path(resume) if resume else None, start_epoch)
    data_meta = {"dataset": cfg.dataset, "in_chans": info.in_chans,
                 "input_size": info.input_size, "mean": list(info.mean), "std": list(info.std),
                 "class_names": train_arrays.class_names, "val_split": cfg.val_split,
                 "val_source": val_name}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(4, device=device)  # total, ce, kd, feat: summed on the device
        if reporter and dist.main:
            reporter.start_epoch(epoch + 1, cfg.epochs, len(batches))
        for step, (x, y) in enumerate(batches, start=1):
            sums += training_step(step_model, x, y, optimizer, scaler, loss_cfg, amp_dtype)
            scheduler.step()
            if step % cfg.log_every == 0 or step == len(batches):
                mean = (sums / step).tolist()  # the only host sync, every log_every steps
                if not all(math.isfinite(v) for v in mean):
                    raise Diverged(_diverged(cfg, epoch + 1, step, mean[0], *last_good,
                                             amp_dtype is not None))
                if reporter and dist.main:
                    seen = step * cfg.batch_size
                    reporter.update(step, dict(zip(("loss", "ce", "kd", "feat"), mean,
                                                   strict=True)),
                                    seen / (time.perf_counter() - t0))
        seconds = time.perf_counter() - t0
        if dist.world > 1:
            torch.distributed.barrier()
        if not dist.main:
            continue
        logits, labels = predict_logits(model, val_batches, device, amp_dtype)
        rows = accuracy_rows(logits, labels)
        val_acc = [r.top1 for r in rows[:-1]]
        log = EpochLog(epoch + 1, optimizer.param_groups[0]["lr"],
                       dict(zip(("loss", "ce", "kd", "feat"), mean, strict=True)), val_acc,
                       rows[-1].top1, len(batches) * cfg.batch_size / seconds, seconds)
        best = max(best, val_acc[-1])
        ckpt = {
            "model_config": asdict(model.config),
            "data": data_meta,
            "train_config": asdict(cfg),
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {"data": generator.get_state(), "torch": torch.get_rng_state()},
            "metrics": {"val_accuracy": val_acc, "val_ensemble": rows[-1].top1, "best": best,
                        "val_source": val_name},
        }
        # last.pt is written last: a run killed before it resumes from the epoch before and
        # redoes this one exactly (its metrics line is dropped and rewritten, best.pt too).
        _append_metrics(out / "metrics.jsonl", log)
        if val_acc[-1] >= best:
            save_checkpoint(out / "best.pt", ckpt)
        save_checkpoint(out / "last.pt", ckpt)
        last_good = (out / "last.pt", epoch + 1)
        if reporter:
            reporter.end_epoch(log)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return out


def _apply_optimizer_config(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig,
                            steps_per_epoch: int) -> None:
    """A loaded optimizer keeps the lr and weight decay it was saved with; give it the
    config's (the same values unless overridden on resume: then bit-for-bit a no-op)."""
    factor = _lr_factor(cfg, steps_per_epoch)(scheduler.last_epoch)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, lr=cfg.lr * factor, weight_decay=cfg.weight_decay)


def _diverged(cfg: TrainConfig, epoch: int, step: int, loss: float, last: Path | None,
              last_epoch: int, amp: bool) -> str:
    lower = f"--lr {cfg.lr / 10:g}" + (" --amp off" if amp else "")
    head = f"training diverged in epoch {epoch}, step {step} (loss {loss})"
    if last is None:
        return (f"{head}; no checkpoint was written yet: train again with a lower learning "
                f"rate ({lower})")
    return (f"{head}; the last good checkpoint is {last} (epoch {last_epoch}). Resume it with "
            f"a lower learning rate: byot-edge train --resume {last} --out {cfg.out} "
            f"--override {lower}")


def _start_metrics(path: Path, start_epoch: int) -> None:
    """metrics.jsonl as the run stands: a new run starts it empty; a resumed one keeps the
    lines of the epochs its checkpoint holds (a later line is from an epoch being redone)."""
    keep = []
    if start_epoch and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] <= start_epoch:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn line from an older version's append
    atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())


def _append_metrics(path: Path, log: EpochLog) -> None:
    # Rewritten whole through a rename: never a torn line (it is one line per epoch).
    old = path.read_bytes() if path.is_file() else b""
    atomic_write_bytes(path, old + (json.dumps(asdict(log)) + "\n").encode())


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints store tuples as lists; TrainConfig wants them back as tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def eval_split(state: dict[str, Any], split: str, *, dataset: str | None = None,
               data_dir: str | Path | None = None) -> tuple[Arrays, Any]:
    """The split a checkpoint should be evaluated on: "test", or "val", the very images its
    training held out (same fraction and seed), so calibration never sees the test set."""
    tc = state.get("train_config", {})
    name = dataset or state["data"]["dataset"]
    data_dir = data_dir or tc.get("data_dir")
    info = dataset_info(name, state["data"].get("input_size") if name == "imagefolder" else None)
    if split == "test":
        return load_arrays(name, data_dir, "test", info.input_size), info
    if split != "val":
        raise ByotError(f"unknown split {split!r}; choose test or val")
    fraction = tc.get("val_split", 0)
    if not fraction:
        raise ByotError("this checkpoint was trained with --val-split 0, so it has no held-out "
                        "validation split; retrain with --val-split 0.1 or evaluate on test")
    train_arrays = load_arrays(name, data_dir, "train", info.input_size)
    _, val_idx = train_val_split(len(train_arrays.labels), fraction, tc.get("seed", 0))
    return train_arrays.subset(val_idx), info
