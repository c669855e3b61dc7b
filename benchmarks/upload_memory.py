"""The server's memory under concurrent large uploads (issue 27, items 6 and 12).

Starts `byot-edge serve` on a loopback port, then sends --clients requests at once, each a
body of about --mb MB that the model cannot take (a JSON tensor and a .npy file of too many
samples, bytes that are not an image, in turn), --rounds times. Reports the server's
resident memory (VmRSS) before, its peak (VmHWM) and after, the statuses, and how long
/healthz took while the uploads were in flight. --server-pythonpath runs another checkout's
server (before/after on the same machine). Writes OUT/upload_memory.json.

    python benchmarks/upload_memory.py --manifest deploy/manifest.json
    python benchmarks/upload_memory.py --manifest deploy/manifest.json \\
        --server-pythonpath /tmp/old-checkout --out runs/upload-memory-before
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from byot_edge import loadgen
from byot_edge.manifest import load_manifest

MIB = 2**20


def bodies(shape: tuple[int, ...], mb: float) -> list[tuple[str, bytes]]:
    """(content type, body) of about `mb` MB each: too many samples, or not an image."""
    numel = int(np.prod(shape))
    npy_samples = max(1, int(mb * 1e6 / (numel * 4)))
    buf = io.BytesIO()
    np.save(buf, np.zeros((npy_samples, *shape), np.float32))
    json_samples = max(1, int(mb * 1e6 / (numel * 5)))  # "0.0, " per value
    tensor = json.dumps({"tensor": np.zeros((json_samples, *shape)).tolist()}).encode()
    junk = np.random.default_rng(0).bytes(int(mb * 1e6))
    return [("application/json", tensor), ("application/x-npy", buf.getvalue()),
            ("image/png", junk)]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (its peak) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


async def burst(url: str, payloads: list[tuple[str, bytes]], clients: int) -> dict[str, Any]:
    """`clients` uploads at once, and /healthz polled until they are answered."""
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=120,
                                 limits=limits) as c:
        async def upload(i: int) -> int:
            media, body = payloads[i % len(payloads)]
            try:
                r = await c.post("/v1/predict", content=body,
                                 headers={"Content-Type": media})
                return r.status_code
            except httpx.TransportError as e:
                return -len(type(e).__name__)  # the connection failed (counted apart)

        async def health(done: asyncio.Event) -> list[float]:
            times = []
            while not done.is_set():
                t0 = time.perf_counter()
                await c.get("/healthz")
                times.append((time.perf_counter() - t0) * 1e3)
                await asyncio.sleep(0.05)
            return times

        done = asyncio.Event()
        poll = asyncio.create_task(health(done))
        t0 = time.perf_counter()
        statuses = await asyncio.gather(*(upload(i) for i in range(clients)))
        seconds = time.perf_counter() - t0
        done.set()
        health_ms = await poll
    return {"statuses": dict(Counter(statuses)), "seconds": round(seconds, 2),
            "healthz_ms_median": round(statistics.median(health_ms), 1),
            "healthz_ms_max": round(max(health_ms), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--mb", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server-pythonpath", default=None)
    ap.add_argument("--serve-args", default="", help="more `byot-edge serve` options")
    ap.add_argument("--out", default="runs/upload-memory")
    args = ap.parse_args()

    shape = tuple(load_manifest(args.manifest).input.shape)
    payloads = bodies(shape, args.mb)
    # `python -m` puts its working directory first on sys.path: run there, not here
    other = args.server_pythonpath
    server = loadgen.start_server(["serve", str(Path(args.manifest).resolve()), "--host",
                                   loadgen.HOST, "--port", "PORT", "--threads", "1",
                                   "--log-level", "warning", *args.serve_args.split()],
                                  {"PYTHONPATH": other} if other else None, cwd=other)
    try:
        pid = server.proc.pid
        before = memory_kib(pid)["VmRSS"]
        rounds = [asyncio.run(burst(server.url, payloads, args.clients))
                  for _ in range(args.rounds)]
        time.sleep(2)  # settled: what the server keeps afterwards
        mem = memory_kib(pid)
    finally:
        server.stop()
    result = {"clients": args.clients, "body_mb": [round(len(b) / 1e6, 2) for _, b in payloads],
              "server_pythonpath": args.server_pythonpath, "serve_args": args.serve_args,
              "rss_mib_before": round(before / 1024), "rss_mib_peak": round(mem["VmHWM"] / 1024),
              "rss_mib_after": round(mem["VmRSS"] / 1024), "rounds": rounds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "upload_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
