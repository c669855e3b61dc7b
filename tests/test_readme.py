"""The README's and docs' deploy-side examples, run as written in a folder laid out as the
quickstart's.

The quickstart leaves runs/quickstart/ with deploy/, val_logits.npz and images/; the README
says every command of its "After the quickstart" block, its Python example and its
`triton-repo` lines (and docs/triton.md's) run from there. Here that folder is the session's
small exported model, and Fashion-MNIST's test split a few CIFAR-layout images of the
model's own shape (the only substitution). Elsewhere: docs/serving.md's examples, which the
README's serving section repeats, run in tests/test_server.py; the Triton client needs a
tritonserver (tests/test_triton.py). Not run: training commands (a dataset and minutes
each; tests/test_cli.py runs `train --resume` as shown) and benchmark reproductions.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from server_fixtures import deployed_model, write_val_logits

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TRITON = (REPO / "docs" / "triton.md").read_text()
QUICKSTART_DATA = "/usr/share/datasets/fashion-mnist"


def section(title: str, text: str = README) -> str:
    start = text.index(title)
    level = title.split(" ")[0]  # "###": up to the next heading of this level or above
    ends = [i for i in (text.find(f"\n{h} ", start + len(title))
                        for h in ("#" * n for n in range(1, len(level) + 1))) if i > 0]
    return text[start:min(ends, default=len(text))]


def blocks(text: str, lang: str = "bash") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def commands() -> list[str]:
    (block,) = blocks(section("### After the quickstart"))
    return [line.split("  #")[0].strip() for line in block.splitlines()
            if line.startswith("byot-edge ")]


def _cifar_test_split(root: Path, n: int, classes: list[str]) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                     "labels": rng.integers(0, len(classes), n).tolist()}, f)
    return root


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory) -> Path:
    deployed = deployed_model(tmp_path_factory)
    run = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(deployed.manifest.parent, run / "deploy")
    manifest = json.loads((run / "deploy" / "manifest.json").read_text())
    manifest["dataset"] = "cifar10"  # what the stand-in test split is stored as
    (run / "deploy" / "manifest.json").write_text(json.dumps(manifest))
    (run / "images").mkdir()
    for i, image in enumerate(p for p in deployed.images if p.suffix == ".png"):
        # the first under the name the README gives it (Fashion-MNIST's first test image)
        shutil.copy(image, run / "images" / (f"test{i}_image.png" if i else
                                             "test0_ankle-boot.png"))
    classes = manifest["class_names"]
    write_val_logits(run / "val_logits.npz", len(manifest["exits"]), len(classes), 300, "cifar10")
    _cifar_test_split(run / "data", 40, classes)
    return run


def test_the_readme_lists_the_deploy_side_commands():
    verbs = {c.split()[1] for c in commands()}
    assert {"predict", "profile", "calibrate", "bench"} <= verbs


@pytest.mark.parametrize("command", commands())
def test_readme_command_runs_as_written(quickstart_dir: Path, command: str):
    line = command.replace(QUICKSTART_DATA, str(quickstart_dir / "data"))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OMP_WAIT_POLICY": "PASSIVE",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-c", line], cwd=quickstart_dir, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr


def test_readme_python_runtime_example_runs_as_written(quickstart_dir: Path):
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S)
                 if "AnytimeModel.load" in b)
    r = subprocess.run([sys.executable, "-c", block], cwd=quickstart_dir, capture_output=True,
                       text=True, timeout=120, env={"OMP_WAIT_POLICY": "PASSIVE"})
    assert r.returncode == 0, r.stderr
    assert re.match(r"class\d+ 0\.\d+ \d ", r.stdout), r.stdout


def _triton_repo_lines() -> list[str]:
    lines = [line.split("  #")[0].strip() for text in (section("## Serving at scale on Triton"),
                                                          TRITON)
             for b in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S)
             for line in b.splitlines() if line.startswith("byot-edge triton-repo ")]
    # --segments tensorrt needs engines from `export --format trt`: not this model's files.
    return sorted({line for line in lines if "--segments tensorrt" not in line})


def test_the_readme_lists_triton_repo_commands():
    assert len(_triton_repo_lines()) >= 3


@pytest.mark.parametrize("command", _triton_repo_lines())
def test_triton_repo_command_runs_as_written(quickstart_dir: Path, tmp_path: Path,
                                             command: str):
    # Each line is an alternative: each writes a model_repository of its own.
    work = tmp_path / "run"
    shutil.copytree(quickstart_dir / "deploy", work / "deploy")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    r = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-2000:])
    assert (work / "model_repository" / "byot" / "config.pbtxt").exists()
