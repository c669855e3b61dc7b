"""Training throughput of byot, dsn and plain on the same network, as ratios from one run.

    python benchmarks/train_throughput.py                       # CPU, ResNet-18 x0.25, 32x32
    python benchmarks/train_throughput.py --device cuda --width 1 --batch 128 --variants all

Rounds interleave the methods (and variants), so slow drift of a shared machine hits them
alike; the figure per method is the median over rounds. "branches overhead" compares a
BYOT step with a step of the bare backbone path (exit K only: stem, sections, fc), i.e.
what the shallow exits and their losses cost during training. On CUDA, `--variants all`
also times AMP, channels-last and torch.compile for the byot step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

import byot_edge  # noqa: F401  (sets the OpenMP wait policy before torch spins up threads)
from byot_edge.losses import LossConfig
from byot_edge.models import create_model
from byot_edge.train import amp_dtype_for, training_step


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    backbone_only: bool = False


class _DeepestOnly(nn.Module):
    """The backbone path alone, shaped like MultiExitNet's output for the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.path = model.truncate(model.num_exits)

    def forward(self, x: torch.Tensor):
        from byot_edge.models import ExitOutputs

        z = self.path(x)
        return ExitOutputs([z], [z])


def _time_variant(v: Variant, args: argparse.Namespace, device: torch.device) -> float:
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=10, width=args.width, input_size=args.size)
    model = model.to(device)
    step_model: nn.Module = _DeepestOnly(model) if v.backbone_only else model
    if v.channels_last:
        step_model = step_model.to(memory_format=torch.channels_last)
    if v.compile:
        step_model = torch.compile(step_model)
    opt = torch.optim.SGD(step_model.parameters(), lr=0.01, momentum=0.9)
    amp = amp_dtype_for(v.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    cfg = LossConfig(method="plain" if v.backbone_only else v.method)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if v.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), device=device)
    for _ in range(args.warmup):
        training_step(step_model, x, y, opt, scaler, cfg, amp)
    _sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        training_step(step_model, x, y, opt, scaler, cfg, amp)
    _sync(device)
    return args.steps * args.batch / (time.perf_counter() - t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", choices=["methods", "all"], default="methods")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    device = torch.device(args.device)

    variants = [Variant("plain", "plain"), Variant("dsn", "dsn"), Variant("byot", "byot"),
                Variant("backbone only", "plain", backbone_only=True)]
    if args.variants == "all" and device.type == "cuda":
        variants += [Variant("byot + amp", "byot", amp="auto"),
                     Variant("byot + amp + channels-last", "byot", amp="auto",
                             channels_last=True),
                     Variant("byot + amp + channels-last + compile", "byot", amp="auto",
                             channels_last=True, compile=True)]
    runs: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            runs[v.name].append(_time_variant(v, args, device))
    median = {k: statistics.median(v) for k, v in runs.items()}

    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads")
    print(f"{args.arch} x{args.width} at {args.size}px, batch {args.batch}, on {device_name}; "
          f"torch {torch.__version__}; median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'variant':40s} {'img/s':>10s} {'vs plain':>9s}")
    for name, ips in median.items():
        print(f"{name:40s} {ips:10.1f} {ips / median['plain']:8.2f}x")
    overhead = median["backbone only"] / median["byot"]
    print(f"branches overhead (backbone-only step / byot step): {overhead:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": device_name, "images_per_s": median,
                       "rounds": runs, "branches_overhead": overhead}, f, indent=2)


if __name__ == "__main__":
    main()
