"""A real `tritonserver` on this machine, from PyPI's nvidia-pytriton wheel (tests, benchmarks).

The wheel ships the server binary, its shared libraries and the Python backend (not the
ONNX Runtime nor the TensorRT backend), with one Python-backend stub per Python version.
Started here with this interpreter's stub, on loopback ports, and with PYTHONPATH naming
where byot-edge and its dependencies are installed (the models add it to their path).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from byot_edge.errors import ByotError

HOST = "127.0.0.1"


def pytriton_server_dir() -> Path | None:
    """The wheel's `pytriton/tritonserver` folder, or None where it is not installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return folder if (folder / "bin" / "tritonserver").is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# numpy < 2 for the Python-backend stub (see stub_site), installed with
# `pip install --target $VENV/triton-stub-site 'numpy<2'` (scripts/test.sh does).
STUB_SITE_ENV = "BYOT_EDGE_TRITON_STUB_SITE"


def stub_site() -> Path | None:
    """A folder holding numpy < 2 for the models, where the stub needs one.

    The Python backend in nvidia-pytriton 0.7 (Triton 2.51) reads numpy 2 arrays as empty
    tensors ("input byte size mismatch ... got 0"), so where this environment has numpy 2
    the stub gets numpy 1 from this folder, ahead of the environment's site-packages.
    """
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    folder = Path(os.environ.get(STUB_SITE_ENV, Path(sys.prefix) / "triton-stub-site"))
    if not (folder / "numpy").is_dir():
        raise ByotError(f"this environment has numpy {numpy.__version__}, which the Python "
                        f"backend of nvidia-pytriton's tritonserver cannot read; install numpy 1 "
                        f"beside it: pip install --target {folder} 'numpy<2' (or set "
                        f"{STUB_SITE_ENV} to such a folder)")
    return folder


def python_path() -> str:
    """Where the models find byot-edge, numpy and onnxruntime: this interpreter's."""
    import byot_edge

    first = stub_site()
    here = [str(Path(byot_edge.__file__).resolve().parents[1]), *site.getsitepackages()]
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(([str(first)] if first else []) + here + extra))


@dataclass
class LocalTriton:
    proc: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _backends(server: Path, workdir: Path) -> Path:
    """The wheel's backends folder with this Python's stub where the backend looks for it."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ByotError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
    backends = workdir / "backends"
    if not backends.is_dir():
        shutil.copytree(server / "backends", backends)
        shutil.copy2(stub, backends / "python" / stub.name)
    return backends


def start_local_triton(repository: Path, workdir: Path, timeout_s: float = 60,
                       extra_args: tuple[str, ...] = ()) -> LocalTriton:
    """Start tritonserver on `repository` and wait until it is ready (all models loaded)."""
    server = pytriton_server_dir()
    if server is None:
        raise ByotError("nvidia-pytriton is not installed (it ships tritonserver); "
                        "pip install nvidia-pytriton")
    workdir.mkdir(parents=True, exist_ok=True)
    backends = _backends(server, workdir)
    libs = server.parents[1] / "nvidia_pytriton.libs"
    env = {**os.environ, "PYTHONPATH": python_path(),
           "LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(libs), os.environ.get(
               "LD_LIBRARY_PATH", "")) if p)}
    ports = [free_port() for _ in range(3)]
    log_path = workdir / "tritonserver.log"
    cmd = [str(server / "bin" / "tritonserver"), "--model-repository", str(repository.resolve()),
           "--backend-directory", str(backends), "--http-address", HOST,
           "--http-port", str(ports[0]), "--grpc-address", HOST, "--grpc-port", str(ports[1]),
           "--metrics-address", HOST, "--metrics-port", str(ports[2]),
           "--exit-timeout-secs", "5", *extra_args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=workdir)
    triton = LocalTriton(proc, *ports, log_path)
    deadline = time.monotonic() + timeout_s
    while not triton.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            triton.stop()
            tail = "\n".join(triton.log().splitlines()[-40:])
            raise ByotError(f"tritonserver did not become ready (exit code {proc.returncode}); "
                            f"its log ends:\n{tail}")
        time.sleep(0.1)
    return triton
