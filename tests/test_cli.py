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
def trained(interrupted):
    """A finished CLI run (the uninterrupted one the resume tests compare with)."""
    return interrupted / "straight"


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


TINY_RUN = ("train", "--dataset", "synthetic", "--width", "0.125", "--epochs", "2",
            "--batch-size", "64", "--max-train-samples", "256")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A CLI run killed after epoch 1's checkpoint (as Ctrl-C would), beside an uninterrupted
    run of the same command."""
    from byot_edge.cli.train import ProgressReporter

    root = tmp_path_factory.mktemp("resume")
    assert _run(*TINY_RUN, "--out", root / "straight").exit_code == 0
    original = ProgressReporter.end_epoch

    def crash(self, log):
        original(self, log)
        raise KeyboardInterrupt

    ProgressReporter.end_epoch = crash
    try:
        r = _run(*TINY_RUN, "--out", root / "cut")
    finally:
        ProgressReporter.end_epoch = original
    assert r.exit_code != 0 and torch.load(root / "cut" / "last.pt")["epoch"] == 1
    return root


def _weights(path):
    return torch.load(path, weights_only=True)


def test_resume_as_the_readme_shows_matches_an_uninterrupted_run(interrupted, tmp_path):
    import shutil

    run = tmp_path / "cut"
    shutil.copytree(interrupted / "cut", run)
    r = _run("train", "--resume", run / "last.pt", "--out", run)  # the README's command
    assert r.exit_code == 0, r.output
    a, b = _weights(interrupted / "straight" / "last.pt"), _weights(run / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["train_config"] == {**b["train_config"],
                                                                    "out": a["train_config"]["out"]}
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_resume_refuses_options_that_differ_from_the_run(interrupted):
    last = interrupted / "cut" / "last.pt"
    before = last.read_bytes()
    _assert_clean_error(_run("train", "--resume", last, "--lr", "0.05"),
                        "--lr 0.05 differs", "which has --lr 0.1", "--override")
    _assert_clean_error(_run("train", "--resume", last, "--width", "0.25", "--override"),
                        "--width 0.25 differs", "--width 0.125", "cannot change on resume")
    _assert_clean_error(_run("train", "--resume", last, "--recipe", "paper"), "--recipe paper")
    _assert_clean_error(_run("train", "--resume", last, "--epochs", "1"),
                        "already finished epoch 1", "--epochs N with N > 1")
    _assert_clean_error(_run(*TINY_RUN, "--override"), "--override only applies with --resume")
    assert last.read_bytes() == before


def test_resume_with_override_takes_the_new_lr(interrupted, tmp_path):
    import shutil

    run = tmp_path / "cut"
    shutil.copytree(interrupted / "cut", run)
    # Options equal to the run's are fine; without --out it stays in the checkpoint's folder.
    r = _run("train", "--resume", run / "last.pt", "--width", "0.125", "--override",
             "--lr", "0.01", "--epochs", "3")
    assert r.exit_code == 0, r.output
    state = _weights(run / "last.pt")
    assert state["epoch"] == 3 and state["train_config"]["lr"] == 0.01
    assert state["train_config"]["out"] == str(run)
    assert all(g["initial_lr"] == 0.01 for g in state["optimizer"]["param_groups"])
    assert state["scheduler"]["base_lrs"] == [0.01]
