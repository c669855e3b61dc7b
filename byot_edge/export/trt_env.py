"""Which TensorRT, and which GPU an engine is built for (what the runtime will compare).

`tensorrt` builds for the GPU it runs on, so that GPU's name and compute capability are
recorded. `tensorrt_rtx` can also build ahead of time, without a GPU, for a compute
capability given by the user; such an engine runs on any GPU of that capability, and its
record has no GPU name.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from byot_edge.errors import ByotError

MODULES = ("tensorrt", "tensorrt_rtx")


def import_tensorrt(module: str = "auto") -> tuple[Any, str]:
    """(module, its name): `tensorrt` first under "auto", then `tensorrt_rtx`."""
    if module not in ("auto", *MODULES):
        raise ByotError(f"unknown TensorRT module {module!r}; choose auto, tensorrt or "
                        "tensorrt_rtx")
    for name in MODULES if module == "auto" else (module,):
        try:
            trt = importlib.import_module(name)
        except ImportError:
            continue
        if version_tuple(str(trt.__version__)) < (10,) and name == "tensorrt":
            raise ByotError(f"TensorRT {trt.__version__} is too old: byot-edge builds with the "
                            "TensorRT 10 API; install it with: pip install 'byot-edge[tensorrt]'")
        return trt, name
    wanted = " or ".join(MODULES) if module == "auto" else module
    raise ByotError(f"{wanted} is not installed (needed for --format trt). Install it with: "
                    "pip install 'byot-edge[tensorrt]' (on Jetson it comes with JetPack; for "
                    "RTX GPUs: pip install tensorrt-rtx)")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def local_gpu() -> tuple[str, str] | None:
    """(name, compute capability "8.7") of CUDA device 0, asked as the runtime asks it
    (cuda-python), else through torch, else nvidia-smi; None without a GPU."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return name.rstrip("\x00"), f"{props.major}.{props.minor}"
    except Exception:  # not installed, no driver, no device: try the next way
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
            name, cc = (p.strip() for p in out.splitlines()[0].split(","))
            return name, cc
        except (subprocess.SubprocessError, ValueError, IndexError, OSError):
            pass
    return None


@dataclass(frozen=True)
class BuildTarget:
    gpu_name: str | None  # None: built ahead of time for any GPU of `compute_capability`
    compute_capability: str
    has_gpu: bool  # a GPU is here: the built engine can be deserialized and inspected
    rtx_capability: Any = None  # tensorrt_rtx.ComputeCapability to target, if ahead of time

    def apply(self, trt: Any, config: Any) -> None:
        if self.rtx_capability is not None:
            config.num_compute_capabilities = 1
            config.set_compute_capability(self.rtx_capability, 0)

    def record(self) -> dict[str, Any]:
        return {"gpu_name": self.gpu_name, "compute_capability": self.compute_capability,
                "ahead_of_time": self.rtx_capability is not None}

    def describe(self) -> str:
        if self.gpu_name:
            return f"{self.gpu_name}, sm {self.compute_capability}"
        return f"any GPU of compute capability {self.compute_capability}, ahead of time"


def build_target(trt: Any, rtx: bool, compute_capability: str | None) -> BuildTarget:
    gpu = local_gpu()
    if compute_capability is not None:
        if not rtx:
            raise ByotError("--compute-capability builds ahead of time, which only TensorRT-RTX "
                            "does; TensorRT builds for the GPU it runs on: drop the option")
        cc = _normalise_cc(compute_capability)
        member = "SM" + cc.replace(".", "")
        if not hasattr(trt.ComputeCapability, member):
            valid = [m[2:-1] + "." + m[-1] for m in dir(trt.ComputeCapability)
                     if m.startswith("SM")]
            raise ByotError(f"TensorRT-RTX {trt.__version__} cannot target compute capability "
                            f"{cc}; choose one of: {', '.join(sorted(valid))}")
        same_gpu = gpu is not None and _normalise_cc(gpu[1]) == cc
        return BuildTarget(None, cc, same_gpu, getattr(trt.ComputeCapability, member))
    if gpu is None:
        hint = ("pass --compute-capability (e.g. 8.9) to build ahead of time for a GPU "
                "elsewhere" if rtx else "build on the device that will run the engines")
        raise ByotError(f"no CUDA GPU found: TensorRT builds engines for the GPU it runs on; "
                        f"{hint}, or export --format onnx here")
    return BuildTarget(gpu[0], _normalise_cc(gpu[1]), True)


def _normalise_cc(value: str) -> str:
    """ "8.9", "89", "sm_89" -> "8.9" (as the runtime compares them)."""
    text = str(value).lower().removeprefix("sm_").removeprefix("sm")
    if "." not in text and text.isdigit() and len(text) >= 2:
        text = f"{text[:-1]}.{text[-1]}"
    if not re.fullmatch(r"\d+\.\d+", text):
        raise ByotError(f"compute capability {value!r} is not like 8.9")
    return text
