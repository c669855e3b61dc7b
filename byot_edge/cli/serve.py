"""`byot-edge serve`: the HTTP server (byot_edge.runtime.server) under uvicorn, with the
process's start-up: signal handlers, and draining the requests in flight on SIGTERM."""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from byot_edge.cli.app import app, at_least, console, err_console
from byot_edge.errors import ByotError, missing_dependency

SERVE_EXAMPLE = """
Examples:

  byot-edge serve deploy/manifest.json --backend onnxruntime --host 127.0.0.1 --port 8080

  BYOT_EDGE_TOKEN=s3cret byot-edge serve deploy/manifest.json --host 0.0.0.0 --max-batch 64 --max-wait-ms 5

  curl -F file=@cat.png 'http://127.0.0.1:8080/v1/predict?threshold=0.9'

Endpoints: POST /v1/predict, GET /v1/model, /healthz, /readyz, /metrics; the API is documented at /docs. Ctrl-C or SIGTERM finishes the requests in flight, then exits.

Needs the serve extra: pip install 'byot-edge\\[serve]'. See docs/serving.md.
"""


# A worker process (--workers N) builds its app from this, set by its parent: uvicorn's
# workers start with `spawn` and take the app as an import string.
WORKER_SPEC = "BYOT_EDGE_SERVE_WORKER"


def worker_app() -> Any:
    """The app of one worker process: its own model, batcher and metrics."""
    from byot_edge.runtime.anytime import AnytimeModel
    from byot_edge.runtime.server import ServeConfig, create_app

    spec = json.loads(os.environ[WORKER_SPEC])
    model = AnytimeModel.load(spec["manifest"], **spec["load"])
    return create_app(model, ServeConfig(**spec["config"]))


def run_uvicorn(app: Any, *, host: str, port: int, log_level: str,
                shutdown_timeout_s: int, workers: int = 1,
                max_connections: int | None = None) -> None:
    """Run the ASGI app until SIGINT/SIGTERM, which finish the requests in flight (up to
    `shutdown_timeout_s`) before returning. With workers > 1, `app` is an import string
    of a factory (uvicorn's convention): that many processes share the port, each with its
    app; the parent passes SIGTERM on to them and waits for their draining.
    `max_connections`: uvicorn's limit_concurrency, per process (503 past it)."""
    try:
        import uvicorn
        from uvicorn.supervisors import Multiprocess
    except ImportError:
        raise missing_dependency("uvicorn", "serve", "to serve models") from None
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout_s, workers=workers,
                            factory=workers > 1, limit_concurrency=max_connections)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped on once it is done; with these handlers in
    # place that is a no-op, so a graceful stop returns normally (exit code 0).
    stopped: list[int] = []
    previous = ({sig: signal.signal(sig, lambda s, _f: stopped.append(s))
                 for sig in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        if workers > 1:
            try:
                sock = config.bind_socket()
            except SystemExit:  # uvicorn exits when the port is taken
                raise ByotError(f"could not listen on {host}:{port}; see the log above") \
                    from None
            # uvicorn < 0.51 wants the function each worker runs (its own server.run)
            old = "target" in inspect.signature(Multiprocess).parameters
            Multiprocess(config, sockets=[sock], **({"target": server.run} if old else {})).run()
            return
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise ByotError(f"the server did not start on {host}:{port}; see the log above")


def _serve_workers(manifest: Path, load: dict[str, Any], config: Any, workers: int,
                   host: str, port: int, log_level: str) -> None:
    """--workers N: the settings go to the workers through the environment."""
    from dataclasses import asdict

    os.environ[WORKER_SPEC] = json.dumps({"manifest": str(manifest.resolve()), "load": load,
                                          "config": asdict(config)})
    run_uvicorn("byot_edge.cli.serve:worker_app", host=host, port=port, log_level=log_level,
                shutdown_timeout_s=config.shutdown_timeout_s, workers=workers,
                max_connections=config.max_connections)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.command("serve", epilog=SERVE_EXAMPLE)
def serve_command(
    manifest: Annotated[Path, typer.Argument(help="manifest.json written by `byot-edge export`.")],
    backend: Annotated[str, typer.Option(help="onnxruntime, tensorrt or torch.")] = "onnxruntime",
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: the "
                                                    "backend's choice).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    max_batch: Annotated[int, typer.Option(
        help="Most samples run together; also the most one request may hold.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(
        help="Once the model is free, the longest a batch waits for requests still being "
             "received to join it (a lone request does not wait).")
    ] = 2.0,
    max_queue: Annotated[int, typer.Option(
        help="Most prediction requests held at once; more get 503 with Retry-After.")] = 64,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body (413 above).")
    ] = 10.0,
    max_bodies_mb: Annotated[float | None, typer.Option(
        help="Most megabytes of request bodies held at once, server-wide, from the first "
             "byte read until decoded; a request that would go past it gets 503 with "
             "Retry-After before its body is read (default: 4 uploads at the limit, at least "
             "64).", show_default=False)] = None,
    max_connections: Annotated[int, typer.Option(
        help="Most connections open at once (uvicorn's limit_concurrency; 503 past it).")
    ] = 1024,
    body_timeout_s: Annotated[float, typer.Option(
        help="Seconds a request body may take to arrive (408 after); a client still sending "
             "holds no queue slot.")] = 30.0,
    token: Annotated[str | None, typer.Option(
        envvar="BYOT_EDGE_TOKEN", show_default=False,
        help="Require 'Authorization: Bearer TOKEN' on /v1/* and /metrics (health endpoints "
             "stay open). Prefer the environment variable: arguments show in `ps`.")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for onnxruntime/torch (default: theirs).")] = None,
    workers: Annotated[int, typer.Option(
        help="Server processes sharing the port, each with its own model, batcher, queue "
             "and metrics (one Python process tops out at about one core of HTTP work).")
    ] = 1,
    model_name: Annotated[str, typer.Option(
        help="The model's name on the Open Inference Protocol routes, /v2/models/NAME (a "
             "Triton client's model name).")] = "byot",
    slo_ms: Annotated[float | None, typer.Option(
        help="Degrade before dropping: every request whose exit is not fixed must be answered "
             "within this many ms of its body arriving (its own deadline_ms when tighter); "
             "under load answers come from shallower exits instead of late, and only a request "
             "that not even exit 1 can answer in time gets 504.", show_default=False)] = None,
    slo_busy: Annotated[float, typer.Option(
        help="With --slo-ms: while the server uses more than this share of its CPUs (or the "
             "model runs more than this share of the time), requests answer at their first "
             "exits, leaving headroom for bursts. 1: only the queue decides.")] = 0.7,
    audit_rate: Annotated[float, typer.Option(
        help="Share of the early answers also run to the deepest exit while the server is "
             "idle, to watch their agreement against calibration's (/metrics: "
             "byot_edge_audit_*; a drift alarm). 0: off.")] = 0.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve an exported model over HTTP, answering each request from the shallowest
    confident exit, with dynamic batching."""
    from byot_edge.runtime.anytime import AnytimeModel
    from byot_edge.runtime.server import ServeConfig, create_app  # fastapi: only when serving

    if not 0 <= port <= 65535:
        raise ByotError(f"--port must be a TCP port, 0..65535, got {port}")
    at_least(threads, 1, "--threads")
    at_least(workers, 1, "--workers")
    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                         max_upload_mb=max_upload_mb, max_bodies_mb=max_bodies_mb,
                         max_connections=max_connections, body_timeout_s=body_timeout_s,
                         token=token, model_name=model_name, slo_ms=slo_ms,
                         slo_busy=slo_busy, audit_rate=audit_rate, freeze_gc=True)
    if token is None and not _is_loopback(host):
        err_console.print(f"[yellow]warning:[/] serving on {host} without a token: anyone who "
                          "can reach it can use it; set BYOT_EDGE_TOKEN", highlight=False)
    load = {"backend": backend, "device": device, **({"threads": threads} if threads else {})}
    with AnytimeModel.load(manifest, **load) as model:
        model.backend.verify_files()
        console.print(f"serving {manifest} ({model.num_exits} exits) with {model.backend.name} "
                      f"on http://{host}:{port} (docs at /docs)"
                      + (f", {workers} worker processes" if workers > 1 else ""),
                      highlight=False, soft_wrap=True)
        if workers == 1:
            run_uvicorn(create_app(model, config), host=host, port=port, log_level=log_level,
                        shutdown_timeout_s=config.shutdown_timeout_s,
                        max_connections=config.max_connections)
    if workers > 1:  # checked above, loaded by each worker
        _serve_workers(manifest, load, config, workers, host, port, log_level)
    console.print("server stopped")
