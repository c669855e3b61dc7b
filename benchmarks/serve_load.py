"""Serving load benchmark: the HTTP server against calling the runtime directly.

For each number of concurrent clients (default 1, 8, 32) it sends a fixed number of
requests (one sample each) to a real `byot-edge serve` on a loopback port and measures
throughput and client-side p50/p99 latency; then it does the same work in-process with
`AnytimeModel.run`:

- direct, batched: the c requests of a round run as one batch (what an ideal batcher with
  no HTTP, no queue and no decoding achieves); each request's latency is its round's time;
- direct, one by one: batch 1, sequentially (the throughput without any batching).

Ratios are server / direct-batched (throughput < 1 and latency > 1 are the cost of HTTP,
decoding and queueing) and server / one-by-one throughput (> 1 is the gain of batching).
Loopback only, bounded by --requests per setting and --seconds per run. Server and direct
runs alternate, never overlap, on the same machine: compare the ratios, not the absolute
numbers, across machines. With --payload png the direct side gets the decoded images:
decoding counts against the server.

    python benchmarks/serve_load.py                                   # a tiny exported model
    python benchmarks/serve_load.py --width 0.5 --threads 1           # a 4x wider one
    python benchmarks/serve_load.py --manifest deploy/manifest.json --clients 1,8,32,64
    python benchmarks/serve_load.py --payload png --max-wait-ms 0 --out runs/serve-load

The client is byot_edge.loadgen (raw asyncio HTTP, as the server tests use it). Writes
OUT/serve_load.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge import loadgen
from byot_edge.loadgen import HOST, ServerProcess, npy_payloads, png_payloads, run_load

REPO = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(f"[serve-load] {msg}", flush=True)


# -- direct runtime references ------------------------------------------------------------


def direct(model: Any, x: np.ndarray, batch: int, requests: int, seconds: float,
           options: Any) -> dict[str, Any]:
    """`requests` samples through model.run in batches of `batch`; latency per round."""
    rounds = max(1, requests // batch)
    times = []
    t0 = time.perf_counter()
    for i in range(rounds):
        idx = np.arange(i * batch, (i + 1) * batch) % len(x)
        start = time.perf_counter()
        model.run(x[idx], options)
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() - t0 > seconds:
            break
    wall = time.perf_counter() - t0
    a = np.asarray(times)
    return {"batch": batch, "requests": len(times) * batch, "wall_s": wall,
            "throughput_rps": len(times) * batch / wall, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99))}


# -- the server ---------------------------------------------------------------------------


def start_server(manifest: Path, args: argparse.Namespace) -> ServerProcess:
    argv = ["serve", str(manifest), "--host", HOST, "--port", "PORT", "--max-batch",
            str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue",
            str(args.max_queue), "--log-level", "warning"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    try:
        return loadgen.start_server(argv, cwd=REPO, timeout_s=120)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def tiny_manifest(out: Path, width: float) -> Path:
    """An untrained CIFAR-sized ResNet-18 at `width`, exported with segments."""
    import torch

    from byot_edge.checkpoint import save_checkpoint
    from byot_edge.export.exporter import export_checkpoint
    from byot_edge.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_chans=3, input_size=32, width=width)
    model.eval()
    ckpt = save_checkpoint(out / "tiny.pt", {
        "model_config": asdict(model.config), "epoch": 0, "model": model.state_dict(),
        "data": {"dataset": "synthetic", "in_chans": 3, "input_size": 32, "mean": [0.5] * 3,
                 "std": [0.25] * 3, "class_names": [f"class{i}" for i in range(10)]},
        "train_config": {}, "metrics": {}})
    manifest, _ = export_checkpoint(ckpt, out / "deploy", segments=True, exporter="torchscript")
    return manifest.root / "manifest.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", type=Path, help="default: export an untrained ResNet-18 "
                    "of --width to a temp dir")
    ap.add_argument("--width", type=float, default=0.125,
                    help="its width: 0.125 (tiny: HTTP costs dominate) .. 1.0 (the paper's)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=400, help="per setting")
    ap.add_argument("--seconds", type=float, default=30.0, help="most per run")
    ap.add_argument("--payload", choices=("npy", "png"), default="npy")
    ap.add_argument("--threshold", type=float, default=None,
                    help="cascade threshold (default: the manifest's thresholds)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="backend CPU threads, both sides")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "serve-load")
    args = ap.parse_args()

    from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
    from byot_edge.runtime.preprocess import load_images

    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest or tiny_manifest(Path(tmp), args.width)
        model = AnytimeModel.load(manifest, **({"threads": args.threads} if args.threads else {}))
        spec = model.manifest.input
        rng = np.random.default_rng(0)
        if args.payload == "png":
            payloads = png_payloads(64, (spec.shape[1], spec.shape[2]))
            paths = []
            for i, p in enumerate(payloads):  # the direct side decodes the same images
                paths.append(Path(tmp) / f"{i}.png")
                paths[-1].write_bytes(p.content)
            x = load_images(paths, spec)
        else:
            x = rng.standard_normal((64, *spec.shape)).astype(spec.dtype)
            payloads = npy_payloads(x)
        options = PredictOptions(threshold=args.threshold)
        params = {"threshold": args.threshold} if args.threshold is not None else {}
        model.warmup(1)
        model.warmup(max(clients))
        say(f"model {manifest} on {model.backend.device}; payload {args.payload}; "
            f"{os.cpu_count()} CPUs")
        server = start_server(manifest, args)
        url = server.url
        rows = []
        try:
            run_load(url, 4, 40, 10, payloads, params)  # server warm-up, not measured
            for c in clients:
                one = direct(model, x, 1, args.requests, args.seconds, options)
                batched = direct(model, x, c, args.requests, args.seconds, options)
                res = run_load(url, c, args.requests, args.seconds, payloads, params)
                srv = res.summary()
                if res.malformed or res.server_errors:
                    say(f"{c} clients: {res.server_errors} 5xx, malformed: {res.malformed[:3]}")
                rows.append({
                    "clients": c, "server": srv, "direct_batched": batched, "direct_one": one,
                    "ratios": {
                        "throughput_vs_batched": srv["throughput_rps"] / batched["throughput_rps"],
                        "p50_vs_batched": srv["p50_ms"] / batched["p50_ms"],
                        "p99_vs_batched": srv["p99_ms"] / batched["p99_ms"],
                        "throughput_vs_one_by_one": srv["throughput_rps"] / one["throughput_rps"],
                    }})
        finally:
            server.stop()
            model.close()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "device": model.backend.device},
              "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / "serve_load.json").write_text(json.dumps(result, indent=2))
    print(f"\n{'clients':>7} | {'server rps':>10} {'p50 ms':>7} {'p99 ms':>7} | "
          f"{'direct rps':>10} {'p50 ms':>7} {'p99 ms':>7} | {'rps x':>6} {'p50 x':>6} "
          f"{'p99 x':>6} | {'vs b=1':>6}")
    for r in rows:
        s, d, q = r["server"], r["direct_batched"], r["ratios"]
        print(f"{r['clients']:>7} | {s['throughput_rps']:>10.1f} {s['p50_ms']:>7.2f} "
              f"{s['p99_ms']:>7.2f} | {d['throughput_rps']:>10.1f} {d['p50_ms']:>7.2f} "
              f"{d['p99_ms']:>7.2f} | {q['throughput_vs_batched']:>6.2f} "
              f"{q['p50_vs_batched']:>6.2f} {q['p99_vs_batched']:>6.2f} | "
              f"{q['throughput_vs_one_by_one']:>6.2f}")
    say(f"wrote {args.out / 'serve_load.json'}")


if __name__ == "__main__":
    main()
