"""Shared fixtures: tiny untrained checkpoints that every part of the toolkit can consume.

The deployment side is also tested where torch is not installed (the compatibility job,
scripts/compat.sh): torch is imported where it is used, and a test module that cannot be
imported without torch is reported as skipped, not as an error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Generator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

HAVE_TORCH = importlib.util.find_spec("torch") is not None
NO_TORCH = "needs torch (the [train] extra), which is not installed"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, Any]:
    report = yield
    # Only a missing torch becomes a skip; every other import error still fails.
    if (not HAVE_TORCH and report.failed
            and "ModuleNotFoundError: No module named 'torch'" in str(report.longrepr)):
        report.outcome = "skipped"
        report.longrepr = (str(collector.path), 0, f"Skipped: {NO_TORCH}")
    return report


def make_checkpoint(
    path: Path,
    arch: str = "resnet18",
    *,
    num_classes: int = 10,
    in_chans: int = 3,
    input_size: int = 32,
    width: float = 0.125,
    seed: int = 0,
    dataset: str = "synthetic",
    train_config: dict | None = None,
) -> Path:
    """An untrained (randomly initialised, BN statistics perturbed) checkpoint."""
    import torch

    from byot_edge.checkpoint import save_checkpoint
    from byot_edge.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans,
                         input_size=input_size, width=width)
    # Non-trivial BN statistics, so an export that mishandles eval-mode BN fails the checks.
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(8, in_chans, input_size, input_size))
    model.eval()
    state = {
        "model_config": asdict(model.config),
        "data": {
            "dataset": dataset,
            "in_chans": in_chans,
            "input_size": input_size,
            "mean": [0.5] * in_chans,
            "std": [0.25] * in_chans,
            "class_names": [f"class{i}" for i in range(num_classes)],
        },
        "train_config": train_config or {"method": "byot"},
        "epoch": 1,
        "model": model.state_dict(),
        "metrics": {"val_accuracy": [0.1] * model.num_exits},
    }
    return save_checkpoint(path, state)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is as fast, and never spin-waits on a shared 2-core machine."""
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "tiny.pt")


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 (JPEG q75) images from ../shared, unpacked to the CIFAR python layout:
    5000 train and 1000 test images."""
    import subprocess
    import sys

    unpack = SHARED_CIFAR / "unpack.py"
    if not unpack.is_file():
        pytest.skip(f"the shared CIFAR-10 data is not at {SHARED_CIFAR}")
    out = tmp_path_factory.mktemp("cifar10")
    subprocess.run([sys.executable, str(unpack), str(out), "--format", "cifar", "--limit", "5000"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def real_data(cifar_slice: Path) -> tuple[str, Path]:
    """(dataset, folder) of a real dataset: Fashion-MNIST from Debian's package where it is
    installed (the test script installs it), else the CIFAR-10 slice."""
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        return "fashion-mnist", FASHION_DIR
    return "cifar10", cifar_slice
