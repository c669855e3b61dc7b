"""Export check benchmark: ONNX Runtime latency of every exported exit against PyTorch eager.

For each exit k, `exit{k}.onnx` in ONNX Runtime (CPU) and `truncate(k)` in PyTorch eager run
the same input at batch 1 and 32; with `--simplify`, the onnxslim-simplified graph runs too
(checked against the original first). The runs are interleaved call by call through the
package's harness (byot_edge.timing.interleave), in one process, so machine noise hits every
variant alike: the ratios are what to compare, the milliseconds are for this machine only.

    python benchmarks/export_check.py --checkpoint runs/r18/best.pt --out /tmp/xc
    python benchmarks/export_check.py --arch resnet18 --width 1.0 --simplify --out /tmp/xc

Without --checkpoint, an untrained model of --arch/--width/--input-size is made (latency does
not depend on the weights). Writes OUT/export_check.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

# Interleaved runners share the cores: idle thread pools must sleep, not spin, or each one
# slows the next. Set before torch starts OpenMP; ONNX Runtime's pools are set per session.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from byot_edge.timing import interleave


def say(msg: str) -> None:
    print(f"[export_check] {msg}", flush=True)


def make_checkpoint(path: Path, arch: str, width: float, input_size: int,
                    num_classes: int) -> Path:
    from byot_edge.checkpoint import save_checkpoint
    from byot_edge.models import create_model

    model = create_model(arch, num_classes=num_classes, input_size=input_size, width=width)
    return save_checkpoint(path, {
        "model_config": asdict(model.config),
        "data": {"dataset": "synthetic", "in_chans": 3, "input_size": input_size,
                 "mean": [0.5] * 3, "std": [0.25] * 3,
                 "class_names": [str(i) for i in range(num_classes)]},
        "model": model.eval().state_dict(),
    })


def ort_session(path: Path | bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts,
                                providers=["CPUExecutionProvider"])


def simplified(path: Path) -> tuple[bytes, int, int]:
    """The onnxslim-simplified graph, and node counts before and after."""
    import onnx
    import onnxslim

    model = onnx.load(path)
    slim = onnxslim.slim(model)
    return slim.SerializeToString(), len(model.graph.node), len(slim.graph.node)


def time_interleaved(runners: dict[str, Callable[[], Any]], repeats: int,
                     warmup: int) -> dict[str, dict[str, float]]:
    """Median and p90 ms per runner; each repetition runs every runner once, in turn."""
    timed = interleave(runners, warmup=warmup, runs=repeats, block=1, max_seconds=math.inf)
    return {name: {"median_ms": t.stats.p50, "p90_ms": t.stats.p90} for name, t in timed.items()}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from byot_edge.checkpoint import load_model
    from byot_edge.export.exporter import export_checkpoint

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(
        out / "untrained.pt", args.arch, args.width, args.input_size, args.num_classes)
    manifest, reports = export_checkpoint(ckpt, out / "deploy", exits=args.exits,
                                          exporter=args.exporter, progress=say)
    model, _ = load_model(ckpt)
    c, h, w = manifest.input.shape
    rows = []
    for k in args.exits or range(1, manifest.num_exits + 1):
        path = manifest.file_path(k, "onnx")
        net = model.truncate(k).eval()
        sessions = {"onnxruntime": ort_session(path, args.threads)}
        nodes = {}
        if args.simplify:
            data, before, after = simplified(path)
            sessions["onnxruntime+slim"] = ort_session(data, args.threads)
            nodes = {"nodes": before, "nodes_simplified": after}
        for batch in args.batches:
            x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(batch))
            xn = x.numpy()
            with torch.no_grad():
                ref = net(x).numpy()
            for name, s in sessions.items():  # a faster wrong graph is no result
                got = s.run(None, {"image": xn})[0]
                err = float(np.abs(got - ref).max() / np.abs(ref).max())
                if err > 1e-4:
                    raise SystemExit(f"{name} differs from PyTorch on exit {k}: rel {err:.2e}")

            def eager(x: torch.Tensor = x, net: torch.nn.Module = net) -> Any:
                with torch.no_grad():
                    return net(x)

            runners: dict[str, Callable[[], Any]] = {"torch": eager}
            for name, s in sessions.items():
                runners[name] = lambda s=s, xn=xn: s.run(None, {"image": xn})
            timing = time_interleaved(runners, args.repeats, args.warmup)
            row = {"exit": k, "batch": batch, **nodes, "ms": timing,
                   "ratio_ort_vs_torch": timing["onnxruntime"]["median_ms"]
                   / timing["torch"]["median_ms"]}
            if args.simplify:
                row["ratio_slim_vs_ort"] = (timing["onnxruntime+slim"]["median_ms"]
                                            / timing["onnxruntime"]["median_ms"])
            rows.append(row)
            say(f"exit {k} batch {batch}: ORT/torch {row['ratio_ort_vs_torch']:.2f}")
    return {
        "arch": manifest.model["arch"], "width": manifest.model.get("width"),
        "input": manifest.input.shape, "threads": args.threads, "repeats": args.repeats,
        "exporter": args.exporter, "machine": platform.processor() or platform.machine(),
        "thread_wait": "passive (OMP_WAIT_POLICY, ORT allow_spinning=0)",
        "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
        "checks": [r.to_dict() for r in reports], "rows": rows,
    }


def _version(module: str) -> str:
    import importlib

    return str(getattr(importlib.import_module(module), "__version__", "?"))


def print_table(result: dict[str, Any], simplify: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['arch']} width {result['width']}, input {result['input']}, "
                        f"{result['threads']} threads: ONNX Runtime vs PyTorch eager")
    cols = ["exit", "batch", "torch ms", "ORT ms", "ORT / torch"]
    if simplify:
        cols += ["slim ms", "slim / ORT", "nodes -> slim"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in result["rows"]:
        ms = r["ms"]
        cells = [str(r["exit"]), str(r["batch"]), f"{ms['torch']['median_ms']:.2f}",
                 f"{ms['onnxruntime']['median_ms']:.2f}", f"{r['ratio_ort_vs_torch']:.2f}"]
        if simplify:
            cells += [f"{ms['onnxruntime+slim']['median_ms']:.2f}",
                      f"{r['ratio_slim_vs_ort']:.2f}",
                      f"{r['nodes']} -> {r['nodes_simplified']}"]
        table.add_row(*cells)
    Console().print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a byot-edge checkpoint (default: an untrained model)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--exits", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 32])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"])
    p.add_argument("--simplify", action="store_true", help="also time the onnxslim graph")
    p.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    args = p.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="export_check-")
    result = bench(args)
    print_table(result, args.simplify)
    path = Path(args.out) / "export_check.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
