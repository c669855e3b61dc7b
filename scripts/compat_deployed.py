"""The server tests' exported model, for the compatibility job (scripts/compat.sh).

The server, install and Triton tests share one exported model (`tests/server_fixtures.py`),
made with torch. The compatibility job tests the deployment side where torch is not
installed, so the model is exported once beforehand by the main venv and handed over:

    .venv/bin/python scripts/compat_deployed.py OUT      # exports into OUT (needs torch)
    BYOT_COMPAT_DEPLOYED=OUT pytest -p compat_deployed    # (scripts/ on PYTHONPATH)

As a pytest plugin it imports `server_fixtures` with its torch-only imports standing in
(they are called only to export, which is done), and fills its cache with OUT's model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1] / "tests"
# What server_fixtures imports that needs torch; nothing of it is called once exported.
TORCH_ONLY = ("torch", "byot_edge.checkpoint", "byot_edge.export.exporter", "byot_edge.models")


class _NeedsTorch(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise ModuleNotFoundError("No module named 'torch'", name="torch")

        return missing


def _import_server_fixtures() -> types.ModuleType:
    sys.path.insert(0, str(TESTS))
    # The torch-free modules it imports are imported for real first: only TORCH_ONLY stand in.
    import byot_edge.export  # kept import-light: no torch
    import byot_edge.loadgen
    import byot_edge.runtime.profile  # noqa: F401

    saved = {name: sys.modules.get(name) for name in TORCH_ONLY}
    try:
        for name in TORCH_ONLY:
            sys.modules[name] = _NeedsTorch(name)
        import server_fixtures
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return server_fixtures


def pytest_configure(config: Any) -> None:
    folder = os.environ.get("BYOT_COMPAT_DEPLOYED")
    if not folder:
        return
    described = json.loads((Path(folder) / "deployed.json").read_text())
    fixtures = _import_server_fixtures()
    fixtures._CACHE["deployed"] = fixtures.Deployed(
        Path(described["manifest"]), [Path(p) for p in described["images"]],
        described["thresholds"])


def export(out: Path) -> None:
    """server_fixtures' model, made once into `out` (with torch, in the main venv)."""
    sys.path.insert(0, str(TESTS))
    import server_fixtures

    class Factory:
        def mktemp(self, name: str) -> Path:
            path = out / name
            path.mkdir(parents=True)
            return path

    if out.exists():
        shutil.rmtree(out)
    deployed = server_fixtures.deployed_model(Factory())
    (out / "deployed.json").write_text(json.dumps({
        "manifest": str(deployed.manifest), "images": [str(p) for p in deployed.images],
        "thresholds": deployed.thresholds}))


if __name__ == "__main__":
    export(Path(sys.argv[1]).resolve())
