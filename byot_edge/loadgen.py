"""A load generator for `byot-edge serve`, and the server as a child process to load.

    server = start_server(["serve", "deploy/manifest.json", "--port", "PORT"])
    try:
        res = run_load(server.url, clients=8, requests=400, seconds=30,
                       payloads=npy_payloads(x))
        print(res.summary())      # throughput, p50/p99, statuses, malformed answers
    finally:
        server.stop()

The client is raw HTTP/1.1 keep-alive on asyncio streams, stdlib and numpy only: it costs
far less CPU per request than a full client library (httpx spends more time per request
than the server on a small model, and here it shares the machine with the server). Every
answer is checked against what the API promises for its status. benchmarks/serve_load.py
and the server tests use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import numpy as np

HOST = "127.0.0.1"  # loopback only
T = TypeVar("T")

# -- the client ---------------------------------------------------------------------------


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
    """One HTTP/1.1 keep-alive connection (no chunked bodies, no TLS)."""

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


def get(url: str, target: str, headers: dict[str, str] | None = None,
        timeout_s: float = 5) -> tuple[int, dict[str, str], bytes]:
    """One GET on a connection of its own (blocking)."""
    async def ask() -> tuple[int, dict[str, str], bytes]:
        conn = Connection(url)
        try:
            return await asyncio.wait_for(conn.request("GET", target, headers=headers),
                                          timeout_s)
        finally:
            await conn.close()

    return asyncio.run(ask())


def multipart(content: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = "byot-edge-load-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
    return body + content + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


async def _load(url: str, clients: int, requests: int, seconds: float,
                payloads: list[Payload], params: dict[str, Any], token: str | None
                ) -> LoadResult:
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


@dataclass(frozen=True)
class Sent:
    """One open-loop request: which payload, when it was due, and what came back."""

    payload: int
    due_s: float  # from the run's start
    status: int  # 0: no answer (connection failed, or the client gave up)
    latency_ms: float  # from when it was due (not when it could be sent) to its answer
    exits: tuple[int, ...] = ()  # 200 only: per sample, the exit that answered
    classes: tuple[int, ...] = ()  # 200 only: per sample, the class answered
    server_ms: float | None = None  # 200 only: the server's own latency_ms
    deadline_left_ms: float | None = None  # 200 with a deadline: what the server had left
    send_lag_ms: float | None = None  # how late the client itself began sending it


async def _open_loop(url: str, rate_rps: float, seconds: float, payloads: list[Payload],
                     target: str, headers: dict[str, str], seed: int, timeout_s: float,
                     max_connections: int) -> list[Sent]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate_rps, int(rate_rps * seconds * 1.5) + 16)
    due = np.cumsum(gaps)
    due = due[due < seconds]
    order = rng.integers(0, len(payloads), len(due))
    idle: list[Connection] = []
    sent: list[Sent] = []
    open_connections = 0
    t0 = time.perf_counter()

    async def one(i: int, at: float) -> None:
        nonlocal open_connections
        if idle:
            conn = idle.pop()
        elif open_connections < max_connections:
            conn, open_connections = Connection(url), open_connections + 1
        else:  # the client's own limit: counted as no answer, never hidden
            sent.append(Sent(int(order[i]), at, 0, float("nan")))
            return
        p = payloads[int(order[i])]
        lag = (time.perf_counter() - t0 - at) * 1e3
        try:
            status, _, data = await asyncio.wait_for(conn.request(
                "POST", target, p.content, {"Content-Type": p.content_type, **headers}),
                timeout_s)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            await conn.close()
            open_connections -= 1
            sent.append(Sent(int(order[i]), at, 0, (time.perf_counter() - t0 - at) * 1e3,
                             send_lag_ms=lag))
            return
        ms = (time.perf_counter() - t0 - at) * 1e3
        idle.append(conn)
        if status != 200:
            sent.append(Sent(int(order[i]), at, status, ms, send_lag_ms=lag))
            return
        doc = json.loads(data)
        preds = doc["predictions"]
        sent.append(Sent(int(order[i]), at, status, ms, tuple(q["exit"] for q in preds),
                         tuple(q["index"] for q in preds), doc.get("latency_ms"),
                         doc.get("deadline_left_ms"), lag))

    tasks = []
    for i, at in enumerate(due):
        # Until it is due, never before: uvloop's timers round to the millisecond and can
        # wake early, and a request sent early would count less than its latency.
        while (wait := at - (time.perf_counter() - t0)) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(i, float(at))))
    await asyncio.gather(*tasks)
    for conn in idle:
        await conn.close()
    return sent


def run_open_loop(url: str, rate_rps: float, seconds: float, payloads: list[Payload],
                  params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                  *, seed: int = 0, timeout_s: float = 10.0,
                  max_connections: int = 512) -> list[Sent]:
    """Open-loop load: requests arrive on a Poisson schedule of `rate_rps` for `seconds`,
    each sent when it is due whether or not earlier ones were answered (a server that
    falls behind is not slowed down by its clients, as closed-loop clients would), each
    on an idle keep-alive connection or a new one (up to `max_connections`). Latency counts
    from when a request was due."""
    target = "/v1/predict" + (f"?{urlencode(params)}" if params else "")
    return _run_fast(_open_loop(url, rate_rps, seconds, payloads, target, headers or {},
                                seed, timeout_s, max_connections))


def _run_fast(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (the serve extra brings it): the client's own
    delays count in every latency it measures, so it should have as few as it can."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def npy_payloads(x: np.ndarray) -> list[Payload]:
    """One .npy request per sample of `x`."""
    out = []
    for sample in x:
        buf = io.BytesIO()
        np.save(buf, sample[None])
        out.append(Payload(buf.getvalue(), "application/x-npy", 1))
    return out


def png_payloads(n: int, size: tuple[int, int], seed: int = 0) -> list[Payload]:
    """`n` random RGB PNGs of `size` (h, w), each a multipart upload."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
        out.append(Payload(buf.getvalue(), "image/png", 1, multipart=True))
    return out


# -- the server, as a child process -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def ready(url: str) -> bool:
    """Whether /readyz answers 200."""
    try:
        return get(url, "/readyz")[0] == 200
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        return False


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)  # its stdout and stderr, as they come

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """One unlabelled sample from /metrics."""
        text = get(self.url, "/metrics", headers)[2].decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        if m is None:
            raise KeyError(f"{name} not in /metrics")
        return float(m.group(1))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` (SIGTERM drains the requests in flight) and wait; its exit code."""
        if self.proc.poll() is None:
            self._signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
            raise RuntimeError(f"the server ignored signal {sig}:\n{self.log}") from None

    def _signal(self, sig: int) -> None:
        # SIGKILL cannot be passed on by the server: it goes to the whole session, so that
        # `--workers N` children do not outlive their supervisor (and keep the port).
        if sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               server: ServerProcess | None = None) -> None:
    """Poll `condition`; raise (with the server's log) on timeout or if the server exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"the server exited ({server.proc.returncode}) while waiting "
                                 f"for {what}:\n{server.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}"
                                 + (f":\n{server.log}" if server else ""))
        time.sleep(0.02)


def start_server(argv: list[str], env: dict[str, str] | None = None, *,
                 cwd: str | Path | None = None, timeout_s: float = 60,
                 prefix: list[str] | None = None) -> ServerProcess:
    """`byot-edge <argv>` in a child process, PORT in `argv` standing for a free loopback
    port; returns once /readyz answers 200 (kills it and raises if it does not). `prefix`:
    a command to run it under, e.g. ["taskset", "-c", "0"]."""
    port = free_port()
    cmd = [*(prefix or []), sys.executable, "-m", "byot_edge.cli",
           *(a.replace("PORT", str(port)) for a in argv)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    server = ServerProcess(f"http://{HOST}:{port}", proc)

    def pump() -> None:  # keep the pipe drained, keep the log for failure messages
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        wait_until(lambda: ready(server.url), timeout_s, "/readyz", server)
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server
