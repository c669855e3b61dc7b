"""What an install holds: every import declared, and the runtime working without torch.

An edge device installs `byot-edge[onnxruntime,serve]` and no training stack, so these tests
run the deploy-side commands in a subprocess where importing torch, torchvision, onnxscript
or matplotlib fails, as it does there.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from server_fixtures import deployed_model, write_val_logits

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "byot_edge"
# Import names whose distribution is called otherwise.
DISTRIBUTION = {"PIL": "pillow", "cuda": "cuda-python", "prometheus_client": "prometheus-client",
                "multipart": "python-multipart", "tensorrt_rtx": "tensorrt-rtx"}
TRAINING_STACK = ("torch", "torchvision", "onnxscript", "matplotlib")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every absolute import in the file, however deep in a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
    return out


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared_distributions(pyproject: Path) -> set[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {_requirement_name(r) for r in reqs}


def undeclared_imports(package: Path, pyproject: Path) -> list[str]:
    declared = declared_distributions(pyproject)
    missing = []
    for path in sorted(package.rglob("*.py")):
        for module, line in _imports(path):
            root = module.split(".")[0]
            if root in sys.stdlib_module_names or root == package.name:
                continue
            dist = DISTRIBUTION.get(root, root).lower().replace("_", "-")
            if dist not in declared:
                missing.append(f"{path.relative_to(package.parent)}:{line} imports {module} "
                               f"({dist} is not a declared dependency or extra)")
    return missing


def test_every_third_party_import_is_declared():
    assert undeclared_imports(PACKAGE, REPO / "pyproject.toml") == []


def test_the_check_sees_an_undeclared_import(tmp_path):
    # What broke the plain install: click came only through another extra's dependency.
    pkg = tmp_path / "byot_edge"
    pkg.mkdir()
    (pkg / "app.py").write_text("import numpy\n\ndef f():\n    import click\n")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["numpy>=1"]\n'
        '[project.optional-dependencies]\nserve = ["uvicorn"]\n')
    (missing,) = undeclared_imports(pkg, tmp_path / "pyproject.toml")
    assert "app.py:4 imports click" in missing


def test_runtime_imports_neither_export_models_nor_torch():
    # The PyTorch backend is the one exception: it rebuilds the network, inside itself.
    allowed = {PACKAGE / "runtime" / "backends" / "torch.py"}
    bad = [f"{path.relative_to(REPO)}:{line} imports {module}"
           for path in sorted((PACKAGE / "runtime").rglob("*.py")) if path not in allowed
           for module, line in _imports(path)
           if module.split(".")[0] in TRAINING_STACK
           or module.startswith(("byot_edge.export", "byot_edge.models", "byot_edge.train",
                                 "byot_edge.checkpoint", "byot_edge.data"))]
    assert bad == []


# Runs first in the subprocess: the training stack (and what BYOT_BLOCK adds) "is not
# installed".
BLOCK = textwrap.dedent(f"""
    import os, sys
    BLOCKED = {TRAINING_STACK!r} + tuple(filter(None, os.environ.get("BYOT_BLOCK", "").split(",")))
    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, _NotInstalled())
""")


def run_without_torch(code: str, *args: str, also: tuple[str, ...] = (),
                      timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "BYOT_BLOCK": ",".join(also)}
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> Path:
    """A copy of the session's exported folder (commands below write into it), with
    validation logits made up for calibration."""
    src = deployed_model(tmp_path_factory)
    folder = tmp_path_factory.mktemp("no-torch") / "deploy"
    shutil.copytree(src.manifest.parent, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    # As if trained with --val-split 0.1: `calibrate --data-dir` draws that split.
    manifest["validation"] = {"dataset": "synthetic", "fraction": 0.1, "seed": 0}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    write_val_logits(folder / "val.npz", len(manifest["exits"]), len(manifest["class_names"]),
                     200, "synthetic")
    return folder


def test_runtime_without_the_training_stack(deploy):
    code = """
        import io, json, sys, time
        import numpy as np
        from byot_edge.runtime.anytime import AnytimeModel, PredictOptions

        manifest = sys.argv[1]
        model = AnytimeModel.load(manifest, backend="onnxruntime", threads=1)
        x = np.random.default_rng(0).standard_normal((4, *model.manifest.input.shape))
        x = x.astype(np.float32)
        out = {
            "fixed": [p.exit for p in model.predict(x, exit=2)],
            "cascade": [p.exit for p in model.predict(x, threshold=0.5)],
            "deadline": [p.exit for p in model.predict(x, budget_ms=1e6)],
            "calibrated": [p.exit for p in model.predict(x)],
        }

        from fastapi.testclient import TestClient
        from byot_edge.runtime.server import ServeConfig, create_app

        buf = io.BytesIO()
        np.save(buf, x[:1])
        with TestClient(create_app(model, ServeConfig())) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)  # warming up in the inference thread
            r = client.post("/v1/predict", content=buf.getvalue(), params={"exit": 1},
                            headers={"Content-Type": "application/x-npy"})
            assert r.status_code == 200, r.text
            out["server"] = [r.status_code, r.json()["predictions"][0]["exit"]]
        out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps(out))
    """
    r = run_without_torch(code, str(deploy / "manifest.json"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["fixed"] == [2, 2, 2, 2]
    assert out["deadline"] == [4, 4, 4, 4]  # every exit fits an unbounded budget
    assert len(out["cascade"]) == len(out["calibrated"]) == 4
    assert out["server"] == [200, 1]
    assert out["loaded"] == []


def test_learned_gates_fit_and_run_without_the_training_stack(tmp_path_factory, tmp_path):
    """Risk-controlled calibration with gates, then the gated cascade, where torch fails."""
    folder = Path(shutil.copytree(deployed_model(tmp_path_factory).manifest.parent,
                                  tmp_path / "deploy"))
    raw = json.loads((folder / "manifest.json").read_text())
    write_val_logits(folder / "val.npz", len(raw["exits"]), len(raw["class_names"]), 400,
                     raw["dataset"])
    code = """
        import json, sys
        import numpy as np
        from byot_edge.calibrate import calibrate_manifest
        from byot_edge.runtime.anytime import AnytimeModel
        calibrate_manifest(sys.argv[1], sys.argv[2], criterion="gate", max_drop=1.0,
                           delta=0.3)
        with AnytimeModel.load(sys.argv[1], threads=1) as model:
            x = np.zeros((3, *model.manifest.input.shape), np.float32)
            out = {"policy": type(model.threshold_policy()).__name__,
                   "guarantee": model.manifest.thresholds.guarantee["method"],
                   "exits": [p.exit for p in model.predict(x)],
                   "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}
        print(json.dumps(out))
    """
    r = run_without_torch(code, str(folder / "manifest.json"), str(folder / "val.npz"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["policy"] == "ExitGates" and out["guarantee"] == "ltt"
    assert len(out["exits"]) == 3 and out["loaded"] == []


CLI = """
    import sys
    from byot_edge.cli import main
    sys.argv = ["byot-edge", *sys.argv[1:]]
    main()
"""


@pytest.mark.parametrize("args", [
    ["--help"],
    ["profile", "{deploy}/manifest.json", "--batch", "1", "--runs", "3", "--warmup", "1",
     "--max-seconds", "0.2", "--threads", "1"],
    ["calibrate", "{deploy}/manifest.json", "--logits", "{deploy}/val.npz", "--max-drop", "1"],
    ["calibrate", "{deploy}/manifest.json", "--data-dir", "{deploy}", "--backend",
     "onnxruntime", "--precision", "fp32", "--max-drop", "1", "--threads", "1"],
    # Learned gates, fitted and then run (predict and bench below) without torch.
    ["calibrate", "{deploy}/manifest.json", "--logits", "{deploy}/val.npz", "--max-drop", "1",
     "--criterion", "gate", "--point"],
    ["predict", "{deploy}/manifest.json", "{image}", "--threads", "1"],
    ["bench", "{deploy}/manifest.json", "--backend", "onnxruntime", "--batch", "1", "--runs",
     "3", "--max-seconds", "0.2", "--out", "{deploy}/bench"],
], ids=["help", "profile", "calibrate", "calibrate-engine", "calibrate-gate", "predict",
        "bench"])
def test_deploy_commands_without_the_training_stack(deploy, tmp_path_factory, args):
    image = deployed_model(tmp_path_factory).images[0]
    argv = [a.format(deploy=deploy, image=image) for a in args]
    r = run_without_torch(CLI, *argv)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(("args", "extra", "also"), [
    (["train", "--dataset", "synthetic", "--out", "{tmp}/run"], "train", ()),
    (["export", "{tmp}/missing.pt", "--out", "{tmp}/deploy"], "train", ()),
    (["calibrate", "{deploy}/manifest.json", "--logits", "{deploy}/val.npz", "--dry-run",
      "--plot", "{tmp}/curve.png"], "plot", ()),
    (["predict", "{deploy}/manifest.json", "{deploy}/val.npz"], "onnxruntime", ("onnxruntime",)),
    (["serve", "{deploy}/manifest.json"], "serve", ("fastapi",)),
], ids=["train", "export", "calibrate-plot", "predict-no-engine", "serve"])
def test_a_command_names_the_extra_it_needs(deploy, tmp_path, args, extra, also):
    r = run_without_torch(CLI, *[a.format(tmp=tmp_path, deploy=deploy) for a in args],
                          also=also)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pip install 'byot-edge[{extra}]'" in lines[0], r.stderr
