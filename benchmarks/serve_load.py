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

Clients (--client): byot_edge.loadgen (raw asyncio HTTP, as the server tests use it; it
checks every answer), or a C client when installed (wrk: HTTP/1.1 keep-alive; ab: HTTP/1.0,
a new connection per request under uvicorn), see byot_edge.loadgen_native. Each row reports
the client's CPU and the server's (its process tree, from /proc) per request, and the mean
batch; with two CPUs or more, server and client are pinned apart with taskset
(--server-cpus, --client-cpus; the direct runs share the client's CPUs). --server-pythonpath
runs another checkout's server against the same direct reference (before/after). Writes
OUT/serve_load.json and prints a table.

    python benchmarks/serve_load.py --manifest deploy/manifest.json --client wrk --exit 2
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
from urllib.parse import urlencode

import numpy as np

from byot_edge import loadgen
from byot_edge import loadgen_native as native
from byot_edge.loadgen import HOST, Payload, ServerProcess, npy_payloads, png_payloads, run_load

REPO = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(f"[serve-load] {msg}", flush=True)


# -- direct runtime references ------------------------------------------------------------


def direct(model: Any, x: np.ndarray, batch: int, requests: int, seconds: float,
           options: Any) -> dict[str, Any]:
    """`requests` samples through model.run in batches of `batch`; latency per round."""
    rounds = max(1, requests // batch)
    times = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(rounds):
        idx = np.arange(i * batch, (i + 1) * batch) % len(x)
        start = time.perf_counter()
        model.run(x[idx], options)
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() - t0 > seconds:
            break
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    a = np.asarray(times)
    return {"batch": batch, "requests": len(times) * batch, "wall_s": wall,
            "cpu_ms_per_sample": cpu * 1e3 / (len(times) * batch),
            "throughput_rps": len(times) * batch / wall, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99))}


# -- the server ---------------------------------------------------------------------------


def start_server(manifest: Path, args: argparse.Namespace) -> ServerProcess:
    argv = ["serve", str(manifest.resolve()), "--host", HOST, "--port", "PORT", "--max-batch",
            str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue",
            str(args.max_queue), "--log-level", "warning"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.workers > 1:
        argv += ["--workers", str(args.workers)]
    env = {"PYTHONPATH": args.server_pythonpath} if args.server_pythonpath else None
    # `python -m` puts its working directory first on sys.path: with another checkout on
    # PYTHONPATH, run from a neutral directory or this checkout's code would be served.
    cwd = tempfile.gettempdir() if args.server_pythonpath else REPO
    try:
        return loadgen.start_server(argv, env, cwd=cwd, timeout_s=120,
                                    prefix=native.pin(args.server_cpus))
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def load(server: ServerProcess, args: argparse.Namespace, clients: int,
         payloads: list[Payload], params: dict[str, Any]) -> dict[str, Any]:
    """One measured load on the server: the client's figures, its CPU and the server's,
    and the mean batch (one worker's, with --workers)."""
    batches = [server.metric(f"byot_edge_batch_size_{s}") for s in ("sum", "count")]
    before = native.cpu_seconds(server.proc.pid)
    if args.client == "python":
        cpu0 = time.process_time()
        res = run_load(server.url, clients, args.requests, args.seconds, payloads, params)
        out = {**res.summary(), "client": "python", "client_cpu_s": time.process_time() - cpu0}
        if res.malformed or res.server_errors:
            say(f"{clients} clients: {res.server_errors} 5xx, malformed: {res.malformed[:3]}")
    else:
        url = f"{server.url}/v1/predict" + (f"?{urlencode(params)}" if params else "")
        p = payloads[0]  # a C client sends one body again and again
        if args.client == "wrk":
            out = native.run_wrk(url, p.content, p.content_type, clients, args.c_seconds,
                                 args.client_cpus)
        else:
            out = native.run_ab(url, p.content, p.content_type, clients, args.requests,
                                args.client_cpus)
    after = native.cpu_seconds(server.proc.pid)
    samples, runs = (server.metric(f"byot_edge_batch_size_{s}") - b
                     for s, b in zip(("sum", "count"), batches, strict=True))
    out["mean_batch"] = samples / runs if runs else None
    served = out["ok"] or 1
    out["server_cpu_ms_per_request"] = (None if before is None or after is None
                                        else (after - before) * 1e3 / served)
    out["client_cpu_ms_per_request"] = out["client_cpu_s"] * 1e3 / served
    return out


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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", type=Path, help="default: export an untrained ResNet-18 "
                    "of --width to a temp dir")
    ap.add_argument("--width", type=float, default=0.125,
                    help="its width: 0.125 (tiny: HTTP costs dominate) .. 1.0 (the paper's)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=400, help="per setting (python, ab)")
    ap.add_argument("--seconds", type=float, default=30.0, help="most per run (python)")
    ap.add_argument("--client", choices=("auto", "python", "wrk", "ab"), default="auto",
                    help="load generator: byot_edge.loadgen (checks every answer), or a C "
                         "client; auto: wrk if installed, else python")
    ap.add_argument("--c-seconds", type=float, default=5.0, help="length of a wrk run")
    ap.add_argument("--payload", choices=("npy", "png"), default="npy")
    ap.add_argument("--threshold", type=float, default=None,
                    help="cascade threshold (default: the manifest's thresholds)")
    ap.add_argument("--exit", type=int, default=None, help="answer from this exit, both sides")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="backend CPU threads, both sides")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes")
    cpus = os.cpu_count() or 1
    ap.add_argument("--server-cpus", default="0" if cpus >= 2 else None,
                    help="taskset CPU list for the server ('' : not pinned; default 0)")
    ap.add_argument("--client-cpus", default=",".join(map(str, range(1, cpus))) or None,
                    help="CPU list for the client and the direct runs (default: the others)")
    ap.add_argument("--server-pythonpath", default=None, help="PYTHONPATH of the server, "
                    "e.g. another checkout: that version against the same direct reference")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "serve-load")
    args = ap.parse_args()
    if args.client == "auto":
        args.client = "wrk" if native.available("wrk") else "python"
    if args.client != "python" and not native.available(args.client):
        raise SystemExit(f"{args.client} is not installed (apt-get install wrk / apache2-utils)")
    if args.client_cpus and hasattr(os, "sched_setaffinity"):  # this process: client, direct
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    return args


def test_inputs(model: Any, args: argparse.Namespace, tmp: str
                ) -> tuple[np.ndarray, list[Payload]]:
    """The samples the direct side runs and the payloads the clients send (the same)."""
    from byot_edge.runtime.preprocess import load_images

    spec = model.manifest.input
    if args.payload == "png":
        payloads = png_payloads(64, (spec.shape[1], spec.shape[2]))
        paths = []
        for i, p in enumerate(payloads):  # the direct side decodes the same images
            paths.append(Path(tmp) / f"{i}.png")
            paths[-1].write_bytes(p.content)
        return load_images(paths, spec), payloads
    x = np.random.default_rng(0).standard_normal((64, *spec.shape)).astype(spec.dtype)
    return x, npy_payloads(x)


def row(c: int, srv: dict[str, Any], batched: dict[str, Any], one: dict[str, Any]
        ) -> dict[str, Any]:
    cpu = srv["server_cpu_ms_per_request"]
    return {"clients": c, "server": srv, "direct_batched": batched, "direct_one": one,
            "ratios": {
                "throughput_vs_batched": srv["throughput_rps"] / batched["throughput_rps"],
                "p50_vs_batched": srv["p50_ms"] / batched["p50_ms"],
                "p99_vs_batched": srv["p99_ms"] / batched["p99_ms"],
                "throughput_vs_one_by_one": srv["throughput_rps"] / one["throughput_rps"],
                # CPU a sample costs run directly (batched) / what a request costs the
                # server: what the throughput ratio would be on a core of its own each.
                "cpu_vs_batched": None if not cpu else batched["cpu_ms_per_sample"] / cpu},
            "overhead_p50_ms": srv["p50_ms"] - one["p50_ms"]}


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'clients':>7} | {'server rps':>10} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'srv cpu':>7} {'cli cpu':>7} | {'direct rps':>10} {'p50 ms':>7} {'cpu':>6} | "
          f"{'rps x':>6} {'cpu x':>6} {'vs b=1':>6} | {'+p50 ms':>7} {'batch':>5}")
    for r in rows:
        s, d, q = r["server"], r["direct_batched"], r["ratios"]
        srv_cpu = s["server_cpu_ms_per_request"] or float("nan")
        print(f"{r['clients']:>7} | {s['throughput_rps']:>10.1f} {s['p50_ms']:>7.2f} "
              f"{s['p99_ms']:>7.2f} {srv_cpu:>7.3f} {s['client_cpu_ms_per_request']:>7.3f} | "
              f"{d['throughput_rps']:>10.1f} {d['p50_ms']:>7.2f} {d['cpu_ms_per_sample']:>6.3f} "
              f"| {q['throughput_vs_batched']:>6.2f} {q['cpu_vs_batched'] or float('nan'):>6.2f} "
              f"{q['throughput_vs_one_by_one']:>6.2f} | {r['overhead_p50_ms']:>7.2f} "
              f"{s['mean_batch'] or float('nan'):>5.1f}")
    print("(cpu: ms of CPU per request, server process tree and client; direct: per sample)")


def main() -> None:
    args = parse_args()
    from byot_edge.runtime.anytime import AnytimeModel, PredictOptions

    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest or tiny_manifest(Path(tmp), args.width)
        model = AnytimeModel.load(manifest, **({"threads": args.threads} if args.threads else {}))
        x, payloads = test_inputs(model, args, tmp)
        options = PredictOptions(threshold=args.threshold, exit=args.exit)
        params = {k: v for k, v in (("threshold", args.threshold), ("exit", args.exit))
                  if v is not None}
        model.warmup(1)
        model.warmup(max(clients))
        say(f"model {manifest} on {model.backend.device}; payload {args.payload}; client "
            f"{args.client}; {os.cpu_count()} CPUs, server on {args.server_cpus or 'any'}, "
            f"client on {args.client_cpus or 'any'}; load average {os.getloadavg()}")
        server = start_server(manifest, args)
        rows = []
        try:
            run_load(server.url, 4, 40, 10, payloads, params)  # server warm-up, not measured
            for c in clients:
                one = direct(model, x, 1, args.requests, args.seconds, options)
                batched = direct(model, x, c, args.requests, args.seconds, options)
                rows.append(row(c, load(server, args, c, payloads, params), batched, one))
        finally:
            server.stop()
            model.close()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "device": model.backend.device,
                          "load_average_after": os.getloadavg()},
              "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / "serve_load.json").write_text(json.dumps(result, indent=2))
    print_table(rows)
    say(f"wrote {args.out / 'serve_load.json'}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
