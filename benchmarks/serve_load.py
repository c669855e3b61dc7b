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

Writes OUT/serve_load.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only


def say(msg: str) -> None:
    print(f"[serve-load] {msg}", flush=True)


# -- the load generator (also used by tests/test_server.py) -------------------------------


@dataclass
class Payload:
    content: bytes
    content_type: str  # for multipart: the part's type, sent as `file`
    samples: int
    multipart: bool = False


@dataclass
class LoadResult:
    clients: int
    requests: int  # sent
    wall_s: float
    latencies_ms: list[float] = field(repr=False)  # of the 200 answers
    statuses: dict[int, int]  # 0: the connection failed without an answer
    malformed: list[str]  # what was wrong with answers that did not match the API

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        return {"clients": self.clients, "requests": self.requests, "ok": self.ok,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "malformed": len(self.malformed), "wall_s": self.wall_s,
                "throughput_rps": self.ok / self.wall_s if self.wall_s > 0 else 0.0,
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def check_answer(status: int, headers: Any, body: bytes, samples: int) -> str | None:
    """None when the response is what the API promises for its status, else what is wrong."""
    try:
        doc = json.loads(body)
    except ValueError:
        return f"{status}: not JSON: {body[:80]!r}"
    if status == 200:
        preds = doc.get("predictions")
        if not isinstance(preds, list) or len(preds) != samples:
            return f"200 with {preds!r:.80} for {samples} sample(s)"
        for p in preds:
            if not (isinstance(p.get("index"), int) and isinstance(p.get("label"), str)
                    and 0 <= p.get("confidence", -1) <= 1 and isinstance(p.get("exit"), int)
                    and p.get("top_k") and p["top_k"][0]["index"] == p["index"]):
                return f"200 with a malformed prediction {p!r:.120}"
        if not isinstance(doc.get("latency_ms"), float | int):
            return "200 without latency_ms"
        return None
    if not isinstance(doc.get("detail"), str) or not doc["detail"]:
        return f"{status} without a detail message: {doc!r:.80}"
    if status == 503 and not str(headers.get("retry-after", "")).isdigit():
        return "503 without a Retry-After header"
    return None


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: a load generator that costs
    far less CPU per request than a full client library (httpx spends more time per request
    than the server on a small model, and it shares the machine with the server)."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port or 80)
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, target: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}",
                f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        got = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        data = await reader.readexactly(int(got.get("content-length", 0)))
        if got.get("connection", "").lower() == "close":
            await self.close()
        return status, got, data

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


def multipart(content: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = "byot-edge-load-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
    return body + content + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


async def _load(url: str, clients: int, requests: int, seconds: float,
                payloads: list[Payload], params: dict[str, Any], token: str | None
                ) -> LoadResult:
    from urllib.parse import urlencode

    target = "/v1/predict" + (f"?{urlencode(params)}" if params else "")
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    bodies = [multipart(p.content, p.content_type) if p.multipart
              else (p.content, p.content_type) for p in payloads]
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    malformed: list[str] = []
    issued = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def one_client(worker: int) -> None:
        nonlocal issued
        conn = Connection(url)
        try:
            while issued < requests and time.perf_counter() < deadline:
                i = (issued + worker) % len(payloads)
                issued += 1
                body, ctype = bodies[i]
                start = time.perf_counter()
                try:
                    status, headers, data = await conn.request(
                        "POST", target, body, {"Content-Type": ctype, **auth})
                except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                    statuses[0] += 1  # no answer at all: counted, reported, reconnected
                    malformed.append(f"connection error: {e!r}")
                    await conn.close()
                    continue
                ms = (time.perf_counter() - start) * 1e3
                statuses[status] += 1
                if status == 200:
                    latencies.append(ms)
                problem = check_answer(status, headers, data, payloads[i].samples)
                if problem:
                    malformed.append(problem)
                if status == 503:  # back off as asked, within the run's bound
                    await asyncio.sleep(min(float(headers.get("retry-after", 1)), 0.05))
        finally:
            await conn.close()

    await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(clients))),
                           seconds + 60)
    return LoadResult(clients, issued, time.perf_counter() - t0, latencies, dict(statuses),
                      malformed)


def run_load(url: str, clients: int, requests: int, seconds: float, payloads: list[Payload],
             params: dict[str, Any] | None = None, token: str | None = None) -> LoadResult:
    """`clients` concurrent clients send up to `requests` requests in all, for at most
    `seconds` (each client finishes the request it is in)."""
    return asyncio.run(_load(url, clients, requests, seconds, payloads, params or {}, token))


def npy_payloads(x: np.ndarray) -> list[Payload]:
    out = []
    for sample in x:
        buf = io.BytesIO()
        np.save(buf, sample[None])
        out.append(Payload(buf.getvalue(), "application/x-npy", 1))
    return out


def png_payloads(n: int, size: tuple[int, int], seed: int = 0) -> list[Payload]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
        out.append(Payload(buf.getvalue(), "image/png", 1, multipart=True))
    return out


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def ready(url: str) -> bool:
    async def ask() -> int:
        conn = Connection(url)
        try:
            return (await asyncio.wait_for(conn.request("GET", "/readyz"), 5))[0]
        finally:
            await conn.close()

    try:
        return asyncio.run(ask()) == 200
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False


def start_server(manifest: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "byot_edge.cli", "serve", str(manifest), "--host", HOST,
           "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms",
           str(args.max_wait_ms), "--max-queue", str(args.max_queue), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        if ready(url):
            return proc, url
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not get ready in 120 s")


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
        proc, url = start_server(manifest, args)
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
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
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
