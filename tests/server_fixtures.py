"""Helpers for the server tests: one exported model per session, and real servers
(`byot-edge serve` in a subprocess on a free loopback port)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import make_checkpoint
from PIL import Image

from byot_edge.checkpoint import load_checkpoint, save_checkpoint
from byot_edge.export.exporter import export_checkpoint
from byot_edge.manifest import Thresholds
from byot_edge.models import model_from_config
from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
from byot_edge.runtime.backends import get_backend
from byot_edge.runtime.preprocess import load_images
from byot_edge.runtime.profile import profile_backend, store_profiles

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Deployed:
    manifest: Path  # do not modify: tests share it
    images: list[Path]  # PNG and JPEG files of assorted sizes
    thresholds: list[float]  # calibrated into the manifest; about half leave at each exit


def _trained_like(path: Path) -> Path:
    """make_checkpoint with each exit's classifier standardised on the features it sees:
    an untrained net's exits otherwise answer every input alike, and no two samples would
    take different exits."""
    ckpt = make_checkpoint(path)
    state = load_checkpoint(ckpt)
    model = model_from_config(state["model_config"])
    model.load_state_dict(state["model"])
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(128, 3, 32, 32, generator=g) * 0.6
         + (torch.rand(128, 3, 1, 1, generator=g) - 0.5) * 3)
    with torch.no_grad():
        for head, f in zip(model.heads, model(x).features, strict=True):
            w = head.fc.weight / (f.std(0) + 1e-6) * 2.0
            head.fc.weight.copy_(w)
            head.fc.bias.copy_(-(w @ f.mean(0)))
    state["model"] = model.state_dict()
    return save_checkpoint(ckpt, state)


def _write_images(folder: Path, n: int) -> list[Path]:
    """Blurry colour blobs with per-image brightness, saved alternately as PNG and JPEG,
    in sizes other than the model's (the server resizes them as load_image does)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        small = rng.random((4, 4, 3)) * 255 * rng.uniform(0.2, 1.0)
        h, w = 24 + 8 * (i % 4), 40 - 4 * (i % 3)
        img = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        path = folder / f"img{i}.{'png' if i % 2 == 0 else 'jpg'}"
        img.save(path)
        paths.append(path)
    return paths


def _median_thresholds(model: AnytimeModel, batch: np.ndarray) -> list[float]:
    """Per shallow exit, halfway between the two middle confidences: about half of the
    images leave at each exit, and none sits near a threshold."""
    out = []
    for k in range(1, model.num_exits):
        s = np.sort(model.run(batch, PredictOptions(exit=k)).confidences.astype(np.float64))
        mid = len(s) // 2
        out.append(float((s[mid - 1] + s[mid]) / 2))
    return out


def write_val_logits(path: Path, num_exits: int, num_classes: int, n: int,
                     dataset: str) -> Path:
    """A made-up `byot-edge eval --save-logits` file in which deeper exits know more."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, num_classes, n)
    logits = rng.standard_normal((num_exits, n, num_classes)).astype(np.float32)
    for e in range(num_exits):
        logits[e, np.arange(n), labels] += 1.0 + e
    np.savez(path, logits=logits, labels=labels, split="val", dataset=dataset,
             exits=np.arange(1, num_exits + 1))
    return path


_CACHE: dict[str, Deployed] = {}


def deployed_model(factory: pytest.TempPathFactory) -> Deployed:
    """Exported once per session (every test module asks for it): all exits and segments,
    calibrated thresholds and a (quick) latency profile in the manifest."""
    if "deployed" not in _CACHE:
        tmp = factory.mktemp("served")
        ckpt = _trained_like(tmp / "model.pt")
        # TorchScript capture: the same files for the runtime, much faster than dynamo here.
        manifest, _ = export_checkpoint(ckpt, tmp / "deploy", segments=True,
                                        exporter="torchscript")
        images = _write_images(tmp / "images", 16)
        with AnytimeModel.load(manifest.root / "manifest.json", threads=1) as model:
            thresholds = _median_thresholds(model, load_images(images, manifest.input))
        manifest.thresholds = Thresholds("max_softmax", thresholds, source="test images")
        backend = get_backend("onnxruntime", manifest, device="cpu", threads=1)
        store_profiles(manifest, profile_backend(backend, (1, 8), warmup=1, runs=5,
                                                 max_seconds=1.0))
        _CACHE["deployed"] = Deployed(manifest.root / "manifest.json", images, thresholds)
    return _CACHE["deployed"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def client(base_url: str, timeout: float = 30, **kwargs: Any) -> httpx.Client:
    # trust_env=False: a proxy configured in the environment must not see loopback traffic.
    return httpx.Client(base_url=base_url, trust_env=False, timeout=timeout, **kwargs)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """One unlabelled sample from /metrics."""
        with client(self.url, headers=headers or {}) as c:
            text = c.get("/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the server ignored signal {sig}:\n{self.log}") from None


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               server: Server | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if server is not None and server.proc.poll() is not None:
            raise AssertionError(f"the server exited ({server.proc.returncode}) while waiting "
                                 f"for {what}:\n{server.log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f":\n{server.log}" if server else ""))
        time.sleep(0.02)


def _ready(url: str) -> bool:
    try:
        with client(url, timeout=2) as c:
            return c.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def start_server(argv: list[str], env: dict[str, str] | None = None) -> Server:
    """`argv` after `byot-edge`, with PORT standing for a free port; waits for /readyz."""
    port = free_port()
    cmd = [sys.executable, "-m", "byot_edge.cli", *(a.replace("PORT", str(port)) for a in argv)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, cwd=REPO)
    server = Server(f"http://{HOST}:{port}", proc)

    def pump() -> None:  # keep the pipe drained, keep the log for failure messages
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        wait_until(lambda: _ready(server.url), 60, "/readyz", server)
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server


@contextmanager
def in_thread(app: Any) -> Iterator[str]:
    """An ASGI app under uvicorn in a thread on a free loopback port; yields its URL once
    /healthz answers (not /readyz: tests of warming up need the server before that)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{HOST}:{port}"

    def up() -> bool:
        try:
            with client(url, timeout=2) as c:
                return c.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, 30, "the in-process server")
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def running(manifest: Path, *options: str, env: dict[str, str] | None = None,
            stop_signal: int = signal.SIGTERM) -> Iterator[Server]:
    server = start_server(["serve", str(manifest), "--host", HOST, "--port", "PORT",
                           "--threads", "1", *options], env)
    try:
        yield server
    finally:
        server.stop(stop_signal)
