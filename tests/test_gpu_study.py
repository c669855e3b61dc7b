"""CI smoke test of benchmarks/gpu_study.sh, the script prepared for a lent H200.

That machine is lent to some sessions only and its time is short, so the script must not
meet its first bug there: here it runs end to end in TINY mode (CPU, synthetic data, a
1/16-wide ResNet-18, one epoch, a few timed calls; about 30-60 s on 2 cores), through the
same code paths as on the GPU except torch.compile. The asserts read what a person would:
the JSON of every part and summary.md, so a part that silently produced nothing fails.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("byot", "plain", "dsn")
EXITS = ("exit 1", "exit 2", "exit 3", "exit 4")


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One TINY run of the whole script (module scope: the asserts below share it)."""
    tmp = tmp_path_factory.mktemp("gpu_study")
    env = {**os.environ, "TINY": "1", "OUT": str(tmp / "out"), "WORK": str(tmp / "work"),
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_study.sh"], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return tmp / "out"


def _load(out: Path, name: str) -> dict[str, Any]:
    data = json.loads((out / f"{name}.json").read_text())
    assert "error" not in data, data["error"]
    return data


@pytest.mark.slow
def test_gpu_study_tiny_smoke_throughput(study: Path) -> None:
    tp = _load(study, "throughput")
    for variant in ("plain", "dsn", "byot", "backbone only", "byot + amp",
                    "byot + amp + channels-last", "plain + amp + channels-last"):
        assert _positive(tp["images_per_s"][variant]), variant
        assert _positive(tp["flops_per_step"][variant]), variant
        assert _positive(tp["tflops"][variant]) and 0 < tp["peak_share"][variant] < 1, variant
    # the branches and their losses add arithmetic to the bare backbone's step
    assert tp["flops_per_step"]["byot"] > tp["flops_per_step"]["backbone only"]
    assert set(tp["byot_over_plain_step_time"]) == {"fp32", "amp", "amp + channels-last"}
    assert all(_positive(v) for v in tp["byot_over_plain_step_time"].values())


@pytest.mark.slow
def test_gpu_study_tiny_smoke_accuracy(study: Path) -> None:
    acc = _load(study, "accuracy")
    assert acc["plan"]["epochs"] == 1 and "reason" in acc["plan"]
    assert sorted(r["method"] for r in acc["runs"]) == sorted(METHODS)  # one run each, seed 0
    for r in acc["runs"]:
        assert "error" not in r and "skipped" not in r, r
        assert r["names"] == [*EXITS, "ensemble"], r["names"]
        assert all(0 <= a <= 1 for a in r["top1"]), r["top1"]
        assert r["epochs"] == 1 and r["test_samples"] > 0 and _positive(r["images_per_s"])
        assert all(_positive(f) for f in r["flops"])
    assert set(acc["summary"]) == set(METHODS)


@pytest.mark.slow
def test_gpu_study_tiny_smoke_runtime(study: Path) -> None:
    rt = _load(study, "runtime")
    assert rt["num_exits"] == 4 and len(rt["thresholds"]) == 3  # calibrated: one per shallow exit
    modes = [*EXITS, "cascade"]
    assert sorted((r["mode"], r["batch"]) for r in rt["rows"]) == sorted(
        (m, b) for m in modes for b in (1, 32))
    for r in rt["rows"]:
        assert r["calls"] > 0 and _positive(r["ms"]["median"]) and _positive(r["images_per_s"])
        assert math.isclose(sum(r["exit_share"]), 1.0), r
        if r["mode"] != "cascade":  # a fixed exit answers everyone there
            assert r["exit_share"][int(r["mode"][-1]) - 1] == 1.0, r
    assert (study / "calibration.png").stat().st_size > 0


@pytest.mark.slow
def test_gpu_study_tiny_smoke_summary(study: Path) -> None:
    text = (study / "summary.md").read_text()
    assert "TINY mode" in text and "## Errors" not in text
    for heading in ("## 1. Training throughput", "## 2. Accuracy", "## 3. Runtime"):
        assert heading in text
    sections = {s.split("\n", 1)[0]: s for s in text.split("## ")}
    accuracy = [line for line in sections["2. Accuracy: test top-1 (%) per exit and ensemble"]
                .splitlines() if line.startswith("| ")]
    assert accuracy[0].startswith(f"| method | {' | '.join(EXITS)} | ensemble |")
    for method in METHODS:  # exactly one row per method
        assert sum(line.startswith(f"| {method} | ") for line in accuracy) == 1, method
    runtime = sections["3. Runtime: torch backend, per exit and the calibrated cascade"]
    for mode in [*EXITS, "cascade"]:
        for batch in (1, 32):
            assert f"| {mode} | {batch} | " in runtime, (mode, batch)
    assert "study.log" in os.listdir(study)


def test_gpu_study_failed_part_is_reported(tmp_path: Path) -> None:
    """A part that breaks (here: no checkpoint to export) fails the run and says so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_study

    out = tmp_path / "out"
    code = gpu_study.main(["--parts", "runtime", "--out", str(out), "--work", str(tmp_path),
                           "--device", "cpu", "--dataset", "synthetic"])
    assert code == 1
    assert "error" in json.loads((out / "runtime.json").read_text())
    assert "## Errors" in (out / "summary.md").read_text()
