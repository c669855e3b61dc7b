"""Names of the processor a backend runs on, read once from the OS (never through torch).

Asking torch for a GPU's name opens a CUDA context of its own next to the inference
engine's, which costs real memory on a Jetson; the kernel driver already says it.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

PROC = Path("/proc")


@functools.cache
def cpu_name(proc: Path = PROC) -> str:
    try:
        for line in (proc / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


@functools.cache
def gpu_name(index: int = 0, proc: Path = PROC) -> str:
    """GPU `index` in PCI bus order, as the NVIDIA driver names it; on a Jetson (an
    integrated GPU the driver does not list there) the board's name; else "gpu"."""
    gpus = sorted((proc / "driver" / "nvidia" / "gpus").glob("*/information"))
    if index < len(gpus):
        try:
            for line in gpus[index].read_text().splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    try:
        board = (proc / "device-tree" / "model").read_text().strip("\x00\n ")
    except OSError:
        board = ""
    return board if "jetson" in board.lower() else "gpu"
