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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
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
from byot_edge.losses import LossConfig, multi_exit_loss
from byot_edge.models import MultiExitNet, create_model
from byot_edge.models.library import is_library_arch
from byot_edge.models.pretrained import imagenet_input_size, load_pretrained
from byot_edge.train_config import RECIPES, RUN_FILES, TrainConfig, resume_config, shown


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
    if cfg.max_train_samples and cfg.max_train_samples < len(train.labels):
        # A seeded random subset: the first N of a class-sorted ImageFolder would hold only
        # its first classes.
        pick = np.random.default_rng(cfg.seed).permutation(len(train.labels))
        train = train.subset(np.sort(pick[:cfg.max_train_samples]))
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
    elif cfg.pretrained == "imagenet" and cfg.dataset == "imagefolder" and not cfg.image_size:
        # ImageFolder images at the size the weights were trained for, unless told otherwise
        cfg = replace(cfg, image_size=imagenet_input_size(cfg.arch))
    cfg.validate()
    device = _pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = _setup_distributed(device)
    try:
        return _train_on(cfg, state, resume, reporter, device, dist)
    finally:
        # Also on an error (a divergence, a bad flag): a process group left at exit aborts
        # the interpreter (SIGABRT from gloo's threads) instead of exiting with the error's code.
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_on(cfg: TrainConfig, state: dict[str, Any] | None, resume: str | Path | None,
              reporter: Any | None, device: torch.device, dist: Dist) -> Path:
    amp_dtype = amp_dtype_for(cfg.amp, device)
    loss_cfg = cfg.loss_config()
    info = dataset_info(cfg.dataset, cfg.image_size)
    torch.manual_seed(cfg.seed)
    train_arrays, val_arrays, val_name = _load_data(cfg)
    num_classes = len(train_arrays.class_names)

    model = create_model(cfg.arch, num_classes=num_classes, in_chans=info.in_chans,
                         input_size=info.input_size, stem=cfg.stem, width=cfg.width,
                         **_exits_option(cfg))
    pretrained = None
    if state is not None:  # normalised as the run started (by its weights' statistics)
        info = replace(info, mean=tuple(state["data"]["mean"]), std=tuple(state["data"]["std"]))
    elif cfg.pretrained:
        pretrained = load_pretrained(model, cfg.pretrained)
        if pretrained.mean and pretrained.std and len(pretrained.mean) == info.in_chans:
            info = replace(info, mean=pretrained.mean, std=pretrained.std)
        if reporter and dist.main and hasattr(reporter, "note"):
            reporter.note(f"backbone: {pretrained.loaded} tensors from {pretrained.source}; "
                          f"inputs normalised with mean {_short(info.mean)}, std "
                          f"{_short(info.std)}")
    bad = [k for k in cfg.feature_exits if not 1 <= k < model.num_exits]
    if bad:
        raise ByotError(f"--feature-exits {shown(tuple(bad))}: only shallow exits "
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

    groups = _param_groups(model, cfg)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  _group_factors(cfg, len(batches), len(groups)))
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
    if state is not None and "pretrained" in state["data"]:
        data_meta["pretrained"] = state["data"]["pretrained"]
    elif pretrained is not None:
        data_meta["pretrained"] = pretrained.source
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
                means = sums / step
                if dist.world > 1:
                    # Every rank must stop together: a non-finite loss seen by one rank alone
                    # (fp16's scaler skips the step for all) would stop it and leave the others
                    # waiting in the next collective. The mean over ranks is NaN on all of them.
                    torch.distributed.all_reduce(means)
                    means /= dist.world
                mean = means.tolist()  # the only host sync, every log_every steps
                if not all(math.isfinite(v) for v in mean):
                    raise Diverged(_diverged(cfg, epoch + 1, step, mean[0], *last_good,
                                             amp_dtype is not None,
                                             optimizer.param_groups[0]["lr"]))
                if reporter and dist.main:
                    seen = step * cfg.batch_size
                    reporter.update(step, dict(zip(("loss", "ce", "kd", "feat"), mean,
                                                   strict=True)),
                                    seen / (time.perf_counter() - t0))
        seconds = time.perf_counter() - t0
        if dist.world > 1:
            torch.distributed.barrier()
        if not dist.main:
            # rank 0 writes it before the next epoch's first collective: any later divergence
            # message names it on every rank
            last_good = (out / "last.pt", epoch + 1)
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
    return out


def _apply_optimizer_config(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig,
                            steps_per_epoch: int) -> None:
    """A loaded optimizer keeps the lr and weight decay it was saved with; give it the
    config's (the same values unless overridden on resume: then bit-for-bit a no-op)."""
    n = len(optimizer.param_groups)
    factors = _group_factors(cfg, steps_per_epoch, n)
    scheduler.base_lrs = [cfg.lr] * n
    for group, factor in zip(optimizer.param_groups, factors, strict=True):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * factor(scheduler.last_epoch),
                     weight_decay=cfg.weight_decay)


def _exits_option(cfg: TrainConfig) -> dict[str, Any]:
    if not cfg.exits:
        return {}
    if not is_library_arch(cfg.arch):
        raise ByotError(f"--exits applies to library backbones (tv:NAME, timm:NAME); "
                        f"{cfg.arch}'s sections are fixed")
    return {"exits": list(cfg.exits)}


def _param_groups(model: MultiExitNet, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One group, or [new parts, backbone] when the backbone learns at another pace. The
    backbone is what pretrained weights fill: stem, sections, the deepest head but its
    classifier."""
    if cfg.backbone_lr == 1.0 and cfg.freeze_backbone_epochs == 0:
        return [{"params": list(model.parameters())}]
    backbone = set(model.source_keys)
    named = list(model.named_parameters())
    return [{"params": [p for k, p in named if k not in backbone]},
            {"params": [p for k, p in named if k in backbone]}]


def _group_factors(cfg: TrainConfig, steps_per_epoch: int,
                   groups: int) -> list[Callable[[int], float]]:
    """The schedule's factor per group: the backbone's is scaled by --backbone-lr and is 0
    while it is frozen (SGD then leaves it as it is; its BatchNorm statistics still adapt)."""
    factor = _lr_factor(cfg, steps_per_epoch)
    if groups == 1:
        return [factor]
    frozen = cfg.freeze_backbone_epochs * steps_per_epoch

    def backbone(step: int) -> float:
        return 0.0 if step < frozen else cfg.backbone_lr * factor(step)

    return [factor, backbone]


def _short(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def suggested_lr(cfg: TrainConfig) -> float:
    """The learning rate to try after a divergence: a tenth of the run's --lr or of its
    recipe's, whichever is lower. A tenth of the run's alone is not enough when --lr was
    raised far past the recipe's (that lr/10 diverges again), and after a resume at a lower
    lr that diverged too it goes lower still."""
    return min(cfg.lr, RECIPES.get(cfg.recipe, {}).get("lr", cfg.lr)) / 10


def _diverged(cfg: TrainConfig, epoch: int, step: int, loss: float, last: Path | None,
              last_epoch: int, amp: bool, lr_now: float) -> str:
    lower = f"--lr {suggested_lr(cfg):g}" + (" --amp off" if amp else "")
    head = (f"training diverged in epoch {epoch}, step {step} (loss {loss}, at a learning "
            f"rate of {lr_now:.3g} on the schedule of --lr {cfg.lr:g}; the {cfg.recipe!r} "
            f"recipe's is {RECIPES.get(cfg.recipe, {}).get('lr', cfg.lr):g})")
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


def eval_split(state: dict[str, Any], split: str, *, dataset: str | None = None,
               data_dir: str | Path | None = None) -> tuple[Arrays, Any]:
    """The split a checkpoint should be evaluated on: "test", or "val", the very images its
    training held out (same fraction and seed), so calibration never sees the test set."""
    tc = state.get("train_config", {})
    name = dataset or state["data"]["dataset"]
    data_dir = data_dir or tc.get("data_dir")
    info = dataset_info(name, state["data"].get("input_size") if name == "imagefolder" else None)
    if "mean" in state["data"] and len(state["data"]["mean"]) == info.in_chans:
        # normalised as it was trained (a pretrained start takes its weights' statistics)
        info = replace(info, mean=tuple(state["data"]["mean"]), std=tuple(state["data"]["std"]))
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
