"""Load from C clients (wrk, ab) and CPU accounting, for benchmarks/serve_load.py.

A Python client spends about as much CPU per request as a fast server (byot_edge.loadgen
is lean, but it is Python); on a small machine it then measures itself as much as the
server. A C client costs a small fraction of that, and its CPU is reported with its
figures (`client_cpu_s`) so a reader sees what the load cost.

- wrk (HTTP/1.1 keep-alive, one thread): the preferred one;
- ab (apache2-utils) sends HTTP/1.0, and uvicorn closes every HTTP/1.0 connection after
  its answer whatever `-k` asks, so under ab each request is a new TCP connection: its
  figures include the connection's cost.

Every figure here is from the client's own count; its answers are not checked (the
Python client checks them; the server tests check every answer).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BYOT_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BYOT_CTYPE")
local token = os.getenv("BYOT_TOKEN")
if token and token ~= "" then wrk.headers["Authorization"] = "Bearer " .. token end
done = function(summary, latency, requests)
  io.write(string.format("BYOT requests=%d duration_us=%d p50_us=%d p99_us=%d status=%d "
    .. "connect=%d read=%d write=%d timeout=%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
"""


def available(client: str) -> bool:
    return shutil.which(client) is not None


def cpu_seconds(pid: int) -> float | None:
    """CPU (user + system) of a process and its children's processes so far, from
    /proc (Linux); None elsewhere."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    if not Path("/proc").is_dir():
        return None
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stats[int(d)] = Path(f"/proc/{d}/stat").read_text()
            except OSError:  # it ended meanwhile
                continue
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for p, text in stats.items():
        fields = text.rpartition(")")[2].split()  # after the command name, which may hold spaces
        parent[p] = int(fields[1])
        cpu[p] = (int(fields[11]) + int(fields[12])) / tick
    if pid not in cpu:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(cpu[p] for p in tree)


def pin(cpus: str | None) -> list[str]:
    """A command prefix pinning to `cpus` (taskset's list, e.g. "1"), or none."""
    return ["taskset", "-c", cpus] if cpus and available("taskset") else []


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run a client to its end; its output and CPU seconds (its own rusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({out.returncode}): {out.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out.stdout, cpu


def run_wrk(url: str, body: bytes, content_type: str, clients: int, seconds: float,
            cpus: str | None = None, token: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        script, data = Path(tmp) / "post.lua", Path(tmp) / "body"
        script.write_text(WRK_SCRIPT)
        data.write_bytes(body)
        env = {**os.environ, "BYOT_BODY": str(data), "BYOT_CTYPE": content_type,
               "BYOT_TOKEN": token or ""}
        out, cpu = _run([*pin(cpus), "wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s",
                         "-s", str(script), url], env)
    m = re.search(r"^BYOT (.*)$", out, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"wrk printed no summary:\n{out[-500:]}")
    f = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    wall = f["duration_us"] / 1e6
    errors = f["connect"] + f["read"] + f["write"] + f["timeout"]
    ok = f["requests"] - f["status"] - errors
    return {"client": "wrk", "clients": clients, "requests": f["requests"], "ok": ok,
            "non_2xx": f["status"], "socket_errors": errors, "wall_s": wall,
            "throughput_rps": ok / wall, "p50_ms": f["p50_us"] / 1e3,
            "p99_ms": f["p99_us"] / 1e3, "client_cpu_s": cpu}


def run_ab(url: str, body: bytes, content_type: str, clients: int, requests: int,
           cpus: str | None = None, token: str | None = None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".body") as data:
        data.write(body)
        data.flush()
        auth = ["-H", f"Authorization: Bearer {token}"] if token else []
        out, cpu = _run([*pin(cpus), "ab", "-q", "-k", "-c", str(clients), "-n",
                         str(requests), "-p", data.name, "-T", content_type, *auth, url])

    def number(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, out, re.MULTILINE)
        return float(m.group(1)) if m else default

    complete = int(number(r"^Complete requests:\s+(\d+)"))
    non_2xx = int(number(r"^Non-2xx responses:\s+(\d+)"))
    # ab counts answers whose length differs from the first as "failed": ours vary
    # (latency figures), so only exceptions and connection failures are errors.
    errors = int(number(r"Connect: (\d+)") + number(r"Exceptions: (\d+)"))
    wall = number(r"^Time taken for tests:\s+([\d.]+)")
    return {"client": "ab", "clients": clients, "requests": complete,
            "ok": complete - non_2xx - errors, "non_2xx": non_2xx, "socket_errors": errors,
            "wall_s": wall, "throughput_rps": (complete - non_2xx) / wall if wall else 0.0,
            "p50_ms": number(r"^\s+50%\s+(\d+)"), "p99_ms": number(r"^\s+99%\s+(\d+)"),
            "client_cpu_s": cpu}
