"""Training throughput of byot, dsn and plain on the same network, as ratios from one run.

    python benchmarks/train_throughput.py                       # CPU, ResNet-18 x0.25, 32x32
    python benchmarks/train_throughput.py --device cuda --width 1 --batch 128 --variants all
    python benchmarks/train_throughput.py --device cuda --width 1 --batch 256 --variants study \
        --flops --json runs/throughput.json

Rounds interleave the methods (and variants), so slow drift of a shared machine hits them
alike; the figure per method is the median over rounds. "branches overhead" compares a
BYOT step with a step of the bare backbone path (exit K only: stem, sections, fc), i.e.
what the shallow exits and their losses cost during training. On CUDA, `--variants all`
also times AMP, channels-last and torch.compile for the byot step. `--variants study` (any
device; `--amp bf16` on a CPU) times plain and byot in fp32, with AMP and with AMP +
channels-last, dsn with AMP + channels-last, and byot with torch.compile on top
(`--no-compile` leaves that out). `--flops` counts the FLOPs of one training step
(forward + backward, torch.utils.flop_counter) per method, so each variant also gets its
achieved TFLOP/s. Each variant's model is built (and compiled) once and timed in every round.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import byot_edge  # noqa: F401  (sets the OpenMP wait policy before torch spins up threads)
from byot_edge.losses import LossConfig
from byot_edge.models import create_model
from byot_edge.timing import interleave
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


def _build_variant(v: Variant, args: argparse.Namespace,
                   device: torch.device) -> Callable[[], torch.Tensor]:
    """One training step of the variant, as a closure over its own model and optimizer."""
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
    return lambda: training_step(step_model, x, y, opt, scaler, cfg, amp)


def _steps(step: Callable[[], torch.Tensor], n: int,
           device: torch.device) -> Callable[[], None]:
    """`n` training steps, returning once the device has finished them."""
    def run() -> None:
        for _ in range(n):
            step()
        _sync(device)
    return run


def _time_variants(steps: dict[str, Callable[[], torch.Tensor]], args: argparse.Namespace,
                   device: torch.device) -> dict[str, list[float]]:
    """img/s of each round of each variant: a round is --warmup untimed steps, then --steps
    timed ones; rounds take turns (byot_edge.timing.interleave), so drift hits all alike."""
    timed = interleave({name: _steps(step, args.steps, device) for name, step in steps.items()},
                       warmup=0, runs=args.rounds, block=1, max_seconds=math.inf,
                       setup={name: _steps(step, args.warmup, device)
                              for name, step in steps.items()})
    return {name: [args.steps * args.batch * 1e3 / ms for ms in t.ms]
            for name, t in timed.items()}


def _compiled(variants: list[Variant], steps: dict[str, Callable[[], torch.Tensor]],
              args: argparse.Namespace, device: torch.device) -> dict[str, str]:
    """Compile the torch.compile variants with their first warm-up step; {name: error} of
    those that fail (a compiler toolchain is needed; the eager figures stand without)."""
    failed = {}
    for v in variants:
        if v.compile:
            try:
                _steps(steps[v.name], 1, device)()
            except Exception as e:
                print(f"{v.name}: failed, left out ({type(e).__name__}: {e})"[:300])
                failed[v.name] = f"{type(e).__name__}: {e}"[:500]
    return failed


def _step_flops(v: Variant, args: argparse.Namespace, device: torch.device) -> int:
    """FLOPs of one training step (forward + backward; the optimizer's elementwise work is
    not counted), on an eager fp32 copy: AMP, channels-last and compile change the speed,
    not the arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode

    step = _build_variant(Variant(v.name, v.method, backbone_only=v.backbone_only), args, device)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _variants(args: argparse.Namespace, device: torch.device) -> list[Variant]:
    variants = [Variant("plain", "plain"), Variant("dsn", "dsn"), Variant("byot", "byot"),
                Variant("backbone only", "plain", backbone_only=True)]
    if args.variants == "all" and device.type == "cuda":
        variants += [Variant("byot + amp", "byot", amp="auto"),
                     Variant("byot + amp + channels-last", "byot", amp="auto",
                             channels_last=True),
                     Variant("byot + amp + channels-last + compile", "byot", amp="auto",
                             channels_last=True, compile=True)]
    if args.variants == "study":
        variants += [Variant(f"{m} + amp", m, amp=args.amp) for m in ("plain", "byot")]
        variants += [Variant(f"{m} + amp + channels-last", m, amp=args.amp, channels_last=True)
                     for m in ("plain", "dsn", "byot")]
        variants.append(Variant("byot + amp + channels-last + compile", "byot", amp=args.amp,
                                channels_last=True, compile=True))
    if args.no_compile:
        variants = [v for v in variants if not v.compile]
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns what `--json` writes (for callers in the same process)."""
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
    p.add_argument("--variants", choices=["methods", "all", "study"], default="methods")
    p.add_argument("--amp", default="auto",
                   help="AMP of the study's amp variants: auto (bf16 on CUDA), bf16 (CPU "
                        "too), fp16")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile variants")
    p.add_argument("--flops", action="store_true",
                   help="count each method's FLOPs per training step; report TFLOP/s")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    variants = _variants(args, device)
    steps = {v.name: _build_variant(v, args, device) for v in variants}
    failed = _compiled(variants, steps, args, device)
    variants = [v for v in variants if v.name not in failed]
    runs = _time_variants({v.name: steps[v.name] for v in variants}, args, device)
    median = {k: statistics.median(v) for k, v in runs.items()}
    flops: dict[str, int] = {}
    if args.flops:
        per_method: dict[tuple[str, bool], int] = {}
        for v in variants:
            key = (v.method, v.backbone_only)
            if key not in per_method:
                per_method[key] = _step_flops(v, args, device)
            flops[v.name] = per_method[key]
    tflops = {k: flops[k] * median[k] / args.batch / 1e12 for k in flops}
    # byot step time over plain step time, for every setting both were timed in
    byot_over_plain = {("fp32" if k == "byot" else k.removeprefix("byot + ")):
                       median[f"plain{k.removeprefix('byot')}"] / ips
                       for k, ips in median.items()
                       if k.startswith("byot") and f"plain{k.removeprefix('byot')}" in median}

    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads")
    print(f"{args.arch} x{args.width} at {args.size}px, batch {args.batch}, on {device_name}; "
          f"torch {torch.__version__}; median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'variant':40s} {'img/s':>10s} {'vs plain':>9s}"
          + (f" {'GFLOP/step':>11s} {'TFLOP/s':>8s}" if flops else ""))
    for name, ips in median.items():
        print(f"{name:40s} {ips:10.1f} {ips / median['plain']:8.2f}x"
              + (f" {flops[name] / 1e9:11.2f} {tflops[name]:8.3f}" if flops else ""))
    overhead = median["backbone only"] / median["byot"]
    print(f"branches overhead (backbone-only step / byot step): {overhead:.2f}x")
    print("byot step time / plain step time: "
          + ", ".join(f"{k} {r:.2f}x" for k, r in byot_over_plain.items()))
    result = {"config": vars(args), "device": device_name, "torch": torch.__version__,
              "images_per_s": median, "rounds": runs, "branches_overhead": overhead,
              "byot_over_plain_step_time": byot_over_plain}
    if flops:
        result |= {"flops_per_step": flops, "tflops": tflops}
    if failed:
        result["failed"] = failed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
