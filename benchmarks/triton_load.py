"""Triton against the runtime called directly (and `byot-edge serve`), under concurrent clients.

Four ways to answer the same one-image requests with the manifest's calibrated thresholds:

- direct: `AnytimeModel.run` called by C threads of this process (no server at all);
- triton-inprocess: a real tritonserver, one Python-backend model running AnytimeModel;
- triton-bls: the same server, the cascade model calling one model per segment (BLS);
- serve: `byot-edge serve`, through its Open Inference Protocol endpoint (/v2).

The servers are all asked the same thing over the same protocol (POST
/v2/models/NAME/infer, binary tensor data) by one light client: raw asyncio HTTP/1.1 on C
keep-alive connections, no client library. For each number of clients the modes take turns,
--rounds times for --seconds each; the table gives throughput, p50/p99 latency, ratios to
direct and how much CPU this process (the client, or for direct the whole runtime) took.
The tritonserver comes from PyPI's nvidia-pytriton wheel (see byot_edge/triton/local.py).

    python benchmarks/triton_load.py --manifest deploy/manifest.json --clients 1,8,32

Writes OUT/triton_load.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from byot_edge.runtime.anytime import AnytimeModel  # noqa: E402
from byot_edge.timing import summarize  # noqa: E402
from byot_edge.triton.local import HOST, free_port, start_local_triton  # noqa: E402
from byot_edge.triton.repository import RepoOptions, write_repository  # noqa: E402


def say(msg: str) -> None:
    print(f"[triton-load] {msg}", flush=True)


def oip_request(model: str, x: np.ndarray, host: str) -> bytes:
    """One POST /v2/models/MODEL/infer with x as binary tensor data."""
    data = np.ascontiguousarray(x, np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    body = header + data
    head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _connection(port: int, requests: list[bytes], stop_at: float,
                      latencies: list[float], offset: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    i = offset
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"the server answered {status!r}")
            latencies.append((time.perf_counter() - t0) * 1e3)
    finally:
        writer.close()


def run_server(port: int, requests: list[bytes], clients: int, seconds: float) -> list[float]:
    latencies: list[float] = []

    async def main() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(_connection(port, requests, stop_at, latencies, c)
                               for c in range(clients)))

    asyncio.run(main())
    return latencies


def run_direct(model: AnytimeModel, images: np.ndarray, clients: int,
               seconds: float) -> list[float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    def worker(c: int) -> None:
        i = c
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            model.run(images[i % len(images)][None])
            latencies.append((time.perf_counter() - t0) * 1e3)  # list.append: thread-safe
            i += 1

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def load_images(cifar: Path | None, model: AnytimeModel, n: int) -> np.ndarray:
    """n CIFAR-10 test images (the python layout's test_batch), normalised as the manifest
    says; random ones (which a trained model may answer all at exit 1) without --cifar."""
    spec = model.manifest.input
    if cifar is None:
        return np.random.default_rng(0).standard_normal((n, *spec.shape)).astype(np.float32)
    import pickle

    from byot_edge.runtime.preprocess import normalise

    with (cifar / "cifar-10-batches-py" / "test_batch").open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    pixels = np.asarray(batch[b"data"][:n], np.uint8).reshape(n, 3, 32, 32)
    return normalise(pixels, spec)


def start_serve(manifest: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "byot_edge.cli", "serve", str(manifest), "--host", HOST,
         "--port", str(port), "--threads", str(threads), "--max-batch", str(max_batch),
         "--log-level", "warning"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/v2/health/ready", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("byot-edge serve did not become ready")


def triton_stats(port: int) -> dict[str, dict[str, float]]:
    """Per model, from Triton's statistics endpoint: requests, executions (batches), mean
    queue and compute time per request."""
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/v2/models/stats", timeout=10) as r:
        doc = json.loads(r.read())
    out = {}
    for m in doc["model_stats"]:
        st = m["inference_stats"]
        n = max(1, int(st["success"]["count"]))
        out[m["name"]] = {
            "requests": int(m["inference_count"]), "executions": int(m["execution_count"]),
            "rows_per_execution": int(m["inference_count"]) / max(1, int(m["execution_count"])),
            "queue_ms": int(st["queue"]["ns"]) / n / 1e6,
            "compute_ms": (int(st["compute_input"]["ns"]) + int(st["compute_infer"]["ns"])
                           + int(st["compute_output"]["ns"])) / n / 1e6}
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, required=True, help="a calibrated deploy folder")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--seconds", type=float, default=3.0, help="per mode, round and clients")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads everywhere")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--modes", default="direct,triton-inprocess,triton-bls,serve")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "triton-load")
    p.add_argument("--cifar", type=Path, default=None,
                   help="folder with cifar-10-batches-py: real test images as requests")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="triton-load-"))
    model = AnytimeModel.load(args.manifest, threads=args.threads)
    model.warmup(1)
    images = load_images(args.cifar, model, 256)
    exits = np.bincount(model.run(images).exits, minlength=model.num_exits + 1)[1:]
    say(f"the requests' exits under the calibrated thresholds: {exits.tolist()} (exits 1..K)")
    opts = dict(threads=args.threads, max_batch=args.max_batch)
    write_repository(args.manifest, work / "bls", RepoOptions(**opts))
    write_repository(args.manifest, work / "inprocess", RepoOptions(
        name="byot_inprocess", mode="inprocess", **opts))
    say("starting tritonserver and byot-edge serve")
    triton = start_local_triton(work / "bls", work / "server",
                                extra_args=("--model-repository", str(work / "inprocess")))
    serve, serve_port = start_serve(args.manifest, args.threads, args.max_batch)
    ports = {"triton-inprocess": (triton.http_port, "byot_inprocess"),
             "triton-bls": (triton.http_port, "byot"), "serve": (serve_port, "byot")}
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in modes}
    try:
        for mode, (port, name) in ports.items():  # warm up every server path
            if mode in modes:
                run_server(port, [oip_request(name, images[i][None], HOST) for i in range(8)],
                           2, 1.0)
        for c in clients:
            lat: dict[str, list[float]] = {m: [] for m in modes}
            cpu: dict[str, float] = dict.fromkeys(modes, 0.0)
            wall: dict[str, float] = dict.fromkeys(modes, 0.0)
            for _ in range(args.rounds):
                for mode in modes:  # the modes take turns
                    t0, p0 = time.perf_counter(), time.process_time()
                    if mode == "direct":
                        lat[mode] += run_direct(model, images, c, args.seconds)
                    else:
                        port, name = ports[mode]
                        reqs = [oip_request(name, x[None], HOST) for x in images]
                        lat[mode] += run_server(port, reqs, c, args.seconds)
                    wall[mode] += time.perf_counter() - t0
                    cpu[mode] += time.process_time() - p0
            for mode in modes:
                s = summarize(lat[mode])
                results[mode][c] = {"requests": len(lat[mode]),
                                    "throughput": len(lat[mode]) / wall[mode],
                                    "p50_ms": s.p50, "p99_ms": s.p99,
                                    "this_process_cpu": cpu[mode] / wall[mode]}
                say(f"{c:>3} clients  {mode:<17} {results[mode][c]['throughput']:8.1f} req/s  "
                    f"p50 {s.p50:7.2f} ms  p99 {s.p99:7.2f} ms")
        stats = triton_stats(triton.http_port)
    finally:
        triton.stop()
        serve.terminate()
        serve.wait(30)
        model.close()
    report(results, clients, modes)
    print("\nwhere Triton's time went, per model, over the whole run (all modes and clients):")
    print("| model | requests | executions | rows per execution | queue ms | compute ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, st in stats.items():
        print(f"| {name} | {st['requests']} | {st['executions']} | {st['rows_per_execution']:.2f} "
              f"| {st['queue_ms']:.2f} | {st['compute_ms']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "triton_load.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
         "exits": exits.tolist(),
         "triton_stats": stats, "cpus": os.cpu_count(),
         "load_average_at_end": os.getloadavg()}, indent=2))
    say(f"wrote {args.out / 'triton_load.json'}")


def report(results: dict[str, dict[int, dict[str, Any]]], clients: list[int],
           modes: list[str]) -> None:
    print("\n| clients | mode | req/s | x direct | p50 ms | p99 ms | this process's CPU |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for c in clients:
        base = results.get("direct", {}).get(c, {}).get("throughput")
        for mode in modes:
            r = results[mode][c]
            ratio = f"{r['throughput'] / base:.2f}" if base else "-"
            print(f"| {c} | {mode} | {r['throughput']:.1f} | {ratio} | {r['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.2f} | {r['this_process_cpu'] * 100:.0f}% |")


if __name__ == "__main__":
    main()
