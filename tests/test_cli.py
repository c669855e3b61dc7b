from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from byot_edge.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = _run("train", "--dataset", "synthetic", "--width", "0.125", "--epochs", "1",
             "--batch-size", "64", "--max-train-samples", "256", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_help_explains_with_examples():
    r = _run("--help")
    assert r.exit_code == 0 and "train" in r.output and "eval" in r.output
    r = _run("train", "--help")
    assert r.exit_code == 0
    for option in ("--arch", "--dataset", "--data-dir", "--epochs", "--resume", "--method",
                   "--recipe", "--amp", "--compile", "--val-split"):
        assert option in r.output
    assert "Examples" in r.output and "byot-edge train" in r.output


def test_train_writes_checkpoints_and_metrics(trained):
    assert (trained / "last.pt").is_file() and (trained / "best.pt").is_file()
    log = json.loads((trained / "metrics.jsonl").read_text().splitlines()[0])
    assert len(log["val_accuracy"]) == 4 and {"ce", "kd", "feat"} <= set(log["loss"])


def test_eval_table_json_and_logits(trained, tmp_path):
    js, npz = tmp_path / "eval.json", tmp_path / "val.npz"
    r = _run("eval", trained / "best.pt", "--split", "val", "--json", js, "--save-logits", npz)
    assert r.exit_code == 0, r.output
    for k in range(1, 5):
        assert f"exit {k}" in r.output
    assert "ensemble" in r.output
    report = json.loads(js.read_text())
    assert [e["name"] for e in report["exits"]][-1] == "ensemble"
    assert all(e["flops"] > 0 and e["params"] > 0 for e in report["exits"])
    d = np.load(npz)
    assert d["logits"].shape[0] == 4 and d["logits"].shape[1] == len(d["labels"])
    assert str(d["split"]) == "val"
    np.testing.assert_array_equal(d["exits"], [1, 2, 3, 4])
    assert d["logits"].shape[1] == report["samples"]


def _assert_clean_error(r, *needles: str):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in r.output, r.output


def test_bad_inputs_give_one_line_errors(trained, tmp_path):
    _assert_clean_error(_run("train", "--dataset", "cifar10", "--data-dir", tmp_path / "nowhere",
                             "--out", tmp_path / "r"), "does not exist")
    _assert_clean_error(_run("train", "--arch", "resnet9", "--dataset", "synthetic",
                             "--out", tmp_path / "r"), "unknown architecture")
    _assert_clean_error(_run("train", "--dataset", "imagenet22k", "--out", tmp_path / "r"),
                        "unknown dataset")
    _assert_clean_error(_run("eval", tmp_path / "missing.pt"), "does not exist")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    _assert_clean_error(_run("eval", junk), "not a readable checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    _assert_clean_error(_run("eval", other), "not a byot-edge checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((trained / "last.pt").read_bytes()[:5000])
    _assert_clean_error(_run("eval", truncated), "truncated or corrupt")
