"""Helpers for the server tests: one exported model per session, and real servers
(`byot-edge serve` in a subprocess on a free loopback port, from byot_edge.loadgen, which
benchmarks/serve_load.py uses too)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import make_checkpoint
from PIL import Image

from byot_edge import loadgen
from byot_edge.checkpoint import load_checkpoint, save_checkpoint
from byot_edge.export.exporter import export_checkpoint
from byot_edge.loadgen import HOST, free_port, wait_until
from byot_edge.loadgen import ServerProcess as Server
from byot_edge.manifest import Thresholds
from byot_edge.models import model_from_config
from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
from byot_edge.runtime.backends import get_backend
from byot_edge.runtime.preprocess import load_images
from byot_edge.runtime.profile import profile_backend, store_profiles

REPO = Path(__file__).resolve().parents[1]
__all__ = ["HOST", "REPO", "Deployed", "Server", "client", "deployed_model", "free_port",
           "in_thread", "running", "start_server", "wait_until", "write_val_logits"]


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
        s = np.sort(model.run(batch, PredictOptions(exit=k)).confidences)
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


def client(base_url: str, timeout: float = 30, **kwargs: Any) -> httpx.Client:
    # trust_env=False: a proxy configured in the environment must not see loopback traffic.
    return httpx.Client(base_url=base_url, trust_env=False, timeout=timeout, **kwargs)


def start_server(argv: list[str], env: dict[str, str] | None = None) -> Server:
    """`argv` after `byot-edge`, with PORT standing for a free port; waits for /readyz."""
    return loadgen.start_server(argv, env, cwd=REPO)


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
