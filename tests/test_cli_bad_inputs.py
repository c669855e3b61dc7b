"""Every command, given input a user can get wrong: one line naming what to fix, exit 2.

Table-driven and in-process (typer's CliRunner): each case runs in a folder holding a
trained run, an exported deploy folder, logits and images, and must leave every file and
folder there exactly as it was (no half-written output, no output folder for a failed run).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from byot_edge.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


class _Payload:
    def __reduce__(self):
        return open, ("pwned", "w")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("ws")
    run = ws / "run"
    r = runner.invoke(app, ["train", "--dataset", "synthetic", "--width", "0.125", "--epochs",
                            "1", "--batch-size", "64", "--max-train-samples", "128",
                            "--out", str(run)])
    assert r.exit_code == 0, r.output
    # TorchScript: a second to capture where the default exporter takes ten; these cases
    # test the commands' input checks, not the exporter (tests/test_export_onnx.py does)
    r = runner.invoke(app, ["export", str(run / "best.pt"), "--segments", "--exporter",
                            "torchscript", "--out", str(ws / "deploy")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(run / "best.pt"), "--split", "val", "--save-logits",
                            str(ws / "val.npz")])
    assert r.exit_code == 0, r.output
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(ws / "img.png")
    (ws / "junk.txt").write_text("not what it should be\n")
    # A PNG whose header claims 200 M pixels: Pillow refuses it as a decompression bomb.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    (ws / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    (ws / "junk.pt").write_bytes(b"\x00" * 100)
    # A deploy folder whose weights.pt (hash updated to match) would run code if unpickled.
    evil = ws / "evil"
    shutil.copytree(ws / "deploy", evil)
    (evil / "weights.pt").write_bytes(pickle.dumps({"model": _Payload()}))
    m = json.loads((evil / "manifest.json").read_text())
    m["weights"]["sha256"] = hashlib.sha256((evil / "weights.pt").read_bytes()).hexdigest()
    (evil / "manifest.json").write_text(json.dumps(m))
    # Manifests that disagree with their model, and a folder with a changed file.
    for name, change in {
        "short_thresholds": lambda d: d["thresholds"].update(values=[0.5]),
        "bad_thresholds": lambda d: d["thresholds"].update(values=[2, -1, 0.5]),
        "one_class": lambda d: d.update(class_names=["only"]),
        "no_val_split": lambda d: d["validation"].update(fraction=0),
    }.items():
        folder = ws / name
        shutil.copytree(ws / "deploy", folder)
        d = json.loads((folder / "manifest.json").read_text())
        d["thresholds"] = {"criterion": "max_softmax", "values": [0.5, 0.5, 0.5]}
        change(d)
        (folder / "manifest.json").write_text(json.dumps(d))
    # Manifests whose file paths leave their folder (each file's sha256 still matches).
    for name, path in {"dotdot": "../deploy/{}",
                       "abs_path": str(ws / "deploy") + "/{}"}.items():
        folder = ws / name
        shutil.copytree(ws / "deploy", folder)
        d = json.loads((folder / "manifest.json").read_text())
        for f in [d["weights"], *(f for e in d["exits"] for f in e["files"].values())]:
            f["path"] = path.format(f["path"])
        (folder / "manifest.json").write_text(json.dumps(d))
    shutil.copytree(ws / "deploy", ws / "corrupt")
    seg = ws / "corrupt" / "segment2.onnx"
    seg.write_bytes(seg.read_bytes()[:-10] + b"0123456789")
    # Checkpoints that are not what `train` writes.
    (ws / "text.pt").write_text("hello\n")
    (ws / "empty.pt").write_bytes(b"")
    import torch

    from byot_edge.checkpoint import load_checkpoint
    state = load_checkpoint(run / "best.pt")
    torch.save({**state, "version": "2"}, ws / "v2.pt")
    torch.save({k: v for k, v in state.items() if k != "model_config"}, ws / "no_model.pt")
    torch.save({k: v for k, v in state.items() if k != "train_config"}, ws / "no_train.pt")
    (ws / "a_file").write_text("a file, not a folder\n")
    return ws


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


SYN = ("train", "--dataset", "synthetic", "--out", "new_run", "--max-train-samples", "128",
       "--batch-size", "64", "--width", "0.125")
M, IMG = "deploy/manifest.json", "img.png"

# (command line, words the one-line error must hold)
CASES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    # train
    (("train", "--dataset", "cifar10", "--data-dir", "nowhere", "--out", "new_run"),
     ("nowhere", "does not exist")),
    (("train", "--dataset", "cifar10", "--out", "new_run"), ("--data-dir",)),
    (("train", "--dataset", "imagenet22k", "--out", "new_run"), ("imagenet22k",)),
    ((*SYN, "--arch", "resnet9"), ("resnet9",)),
    ((*SYN, "--recipe", "fast"), ("fast", "quick")),
    ((*SYN, "--epochs", "0"), ("--epochs",)),
    ((*SYN, "--batch-size", "0"), ("--batch-size",)),
    ((*SYN, "--lr", "-1"), ("--lr",)),
    ((*SYN, "--lr", "nan"), ("--lr",)),
    ((*SYN, "--weight-decay", "-1"), ("--weight-decay",)),
    ((*SYN, "--width", "0"), ("--width",)),
    ((*SYN, "--feature-exits", "a,b"), ("--feature-exits",)),
    ((*SYN, "--feature-exits", "7"), ("--feature-exits",)),
    ((*SYN, "--method", "foo"), ("--method", "foo")),
    ((*SYN, "--schedule", "foo"), ("--schedule", "foo")),
    ((*SYN, "--amp", "foo"), ("--amp", "foo")),
    ((*SYN, "--device", "foo"), ("--device", "foo")),
    ((*SYN, "--device", "cuda:7"), ("--device",)),
    ((*SYN, "--stem", "foo"), ("--stem", "foo")),
    ((*SYN, "--val-split", "1.5"), ("--val-split",)),
    ((*SYN, "--alpha", "2"), ("--alpha",)),
    ((*SYN, "--temperature", "0"), ("--temperature",)),
    ((*SYN, "--feature-weight", "-1"), ("--feature-weight",)),
    ((*SYN, "--cutout", "-1"), ("--cutout",)),
    ((*SYN, "--max-train-samples", "0"), ("--max-train-samples",)),
    ((*SYN, "--image-size", "4"), ("--image-size",)),
    ((*SYN, "--threads", "0"), ("--threads",)),
    (("train", "--resume", "missing.pt"), ("missing.pt", "does not exist")),
    (("train", "--resume", "junk.pt"), ("junk.pt",)),
    (("train", "--resume", M), ("manifest.json",)),
    (("train", "--resume", "run/last.pt", "--arch", "resnet34"), ("--arch", "resnet18")),
    (("train", "--resume", "run/last.pt", "--epochs", "1"), ("--epochs",)),
    # eval
    (("eval", "missing.pt"), ("missing.pt",)),
    (("eval", "junk.pt"), ("junk.pt",)),
    (("eval", M), ("manifest.json",)),
    (("eval", "run/best.pt", "--split", "foo"), ("--split", "foo")),
    (("eval", "run/best.pt", "--batch-size", "0"), ("--batch-size",)),
    (("eval", "run/best.pt", "--device", "foo"), ("--device", "foo")),
    (("eval", "run/best.pt", "--dataset", "foo"), ("foo",)),
    (("eval", "run/best.pt", "--dataset", "cifar10"), ("--data-dir",)),
    (("eval", "run/best.pt", "--json", "run"), ("--json", "folder")),
    (("eval", "run/best.pt", "--save-logits", "run"), ("--save-logits", "folder")),
    # export
    (("export", "missing.pt", "--out", "new_deploy"), ("missing.pt",)),
    (("export", "run/best.pt", "--exit", "9", "--out", "new_deploy"), ("exit 9", "1..4")),
    (("export", "run/best.pt", "--exit", "x", "--out", "new_deploy"), ("--exit",)),
    (("export", "run/best.pt", "--format", "foo", "--out", "new_deploy"), ("--format", "foo")),
    (("export", "run/best.pt", "--batch-range", "1,2", "--out", "new_deploy"),
     ("--batch-range",)),
    (("export", "run/best.pt", "--exit", ",", "--out", "new_deploy"), ("--exit", "1,3")),
    (("export", "run/best.pt", "--batch", "0", "--out", "new_deploy"), ("--batch",)),
    (("export", "run/best.pt", "--opset", "5", "--out", "new_deploy"), ("--opset",)),
    (("export", "run/best.pt", "--exporter", "foo", "--out", "new_deploy"),
     ("--exporter", "foo")),
    (("export", "run/best.pt", "--rtol", "-1", "--out", "new_deploy"), ("--rtol",)),
    (("export", "run/best.pt", "--precision", "fp8", "--out", "new_deploy"),
     ("--precision", "fp8")),
    # predict
    (("predict", "missing.json", IMG), ("missing.json",)),
    (("predict", "junk.txt", IMG), ("junk.txt",)),
    (("predict", M, "missing.png"), ("missing.png",)),
    (("predict", M, "junk.txt"), ("junk.txt",)),
    (("predict", M, "bomb.png"), ("bomb.png", "too large")),
    (("predict", M, IMG, "--exit", "9"), ("exit", "9")),
    (("predict", M, IMG, "--threshold", "abc"), ("--threshold",)),
    (("predict", M, IMG, "--threshold", ","), ("--threshold", "0.9,0.8")),
    (("predict", M, IMG, "--threshold", "nan"), ("threshold", "[0, 1]")),
    (("predict", M, IMG, "--backend", "foo"), ("foo",)),
    (("predict", M, IMG, "--stat", "foo"), ("foo",)),
    (("predict", M, IMG, "--criterion", "foo"), ("foo",)),
    (("predict", M, IMG, "--budget-ms", "-1"), ("budget",)),
    (("predict", M, IMG, "--threads", "0"), ("--threads",)),
    (("predict", M, IMG, "--backend", "torch", "--device", "foo"), ("foo",)),
    (("predict", "evil/manifest.json", IMG, "--backend", "torch"), ("weights.pt",)),
    # calibrate
    (("calibrate", M, "--logits", "missing.npz"), ("missing.npz",)),
    (("calibrate", M, "--logits", "junk.txt"), ("junk.txt",)),
    (("calibrate", "missing.json", "--logits", "val.npz"), ("missing.json",)),
    (("calibrate", M, "--logits", "val.npz", "--max-drop", "-1"), ("--max-drop",)),
    (("calibrate", M, "--logits", "val.npz", "--flops-budget", "abc"), ("--flops-budget",)),
    (("calibrate", M, "--logits", "val.npz", "--criterion", "foo"), ("foo",)),
    (("calibrate", M, "--logits", "val.npz", "--latency-budget-ms", "1"), ("profile",)),
    (("calibrate", M, "--logits", "val.npz", "--rows", "0"), ("--rows",)),
    (("calibrate", M), ("exactly one of --logits", "--data-dir")),
    (("calibrate", M, "--logits", "val.npz", "--data-dir", "."), ("exactly one", "not both")),
    (("calibrate", M, "--logits", "val.npz", "--precision", "int8"),
     ("--precision", "only apply with --data-dir")),
    (("calibrate", M, "--data-dir", ".", "--precision", "int8"),
     ("--precision int8", "fp32 files", "--precision int8 --data-dir")),
    (("calibrate", M, "--data-dir", ".", "--precision", "int4"), ("int4",)),
    (("calibrate", M, "--data-dir", ".", "--backend", "foo"), ("foo",)),
    (("calibrate", "no_val_split/manifest.json", "--data-dir", "."),
     ("--val-split 0", "no held-out validation split")),
    # profile
    (("profile", "missing.json"), ("missing.json",)),
    (("profile", M, "--batch", "a"), ("--batch",)),
    (("profile", M, "--batch", "0"), ("--batch",)),
    (("profile", M, "--runs", "0"), ("--runs",)),
    (("profile", M, "--warmup", "-1"), ("--warmup",)),
    (("profile", M, "--max-seconds", "0"), ("--max-seconds",)),
    (("profile", M, "--backend", "foo"), ("foo",)),
    # bench
    (("bench", "missing.json", "--out", "new_bench"), ("missing.json",)),
    (("bench", M, "--batch", "a", "--out", "new_bench"), ("--batch",)),
    (("bench", M, "--batch", "0", "--out", "new_bench"), ("--batch",)),
    (("bench", M, "--runs", "0", "--out", "new_bench"), ("--runs",)),
    (("bench", M, "--limit", "0", "--out", "new_bench"), ("--limit",)),
    (("bench", M, "--backend", "foo", "--out", "new_bench"), ("foo",)),
    # serve (every case must fail before the server starts)
    (("serve", "missing.json"), ("missing.json",)),
    (("serve", M, "--max-batch", "0"), ("--max-batch",)),
    (("serve", M, "--max-queue", "0"), ("--max-queue",)),
    (("serve", M, "--max-wait-ms", "-1"), ("--max-wait-ms",)),
    (("serve", M, "--max-upload-mb", "0"), ("--max-upload-mb",)),
    (("serve", M, "--port", "99999"), ("--port",)),
    (("serve", M, "--token", " "), ("token",)),
    (("serve", M, "--backend", "foo"), ("foo",)),
    # a corrupt deploy folder and manifests that disagree with their model
    (("serve", "corrupt/manifest.json"), ("segment2.onnx", "sha256")),
    (("serve", "short_thresholds/manifest.json"), ("1 thresholds", "needs 3")),
    (("predict", "short_thresholds/manifest.json", IMG), ("1 thresholds", "needs 3")),
    # the manifest check (thresholds [-1] outside [0, 1]) or the schema, which agree on it
    (("predict", "bad_thresholds/manifest.json", IMG), ("thresholds", "-1")),
    (("predict", "one_class/manifest.json", IMG), ("1 class names", "10-class")),
    # thresholds outside [0, 1] (2 switches an exit off)
    (("predict", M, IMG, "--threshold", "1.5"), ("threshold", "[0, 1]")),
    (("predict", M, IMG, "--threshold", "-1"), ("threshold", "[0, 1]")),
    # checkpoints that are not checkpoints
    (("eval", "text.pt"), ("text.pt",)),
    (("eval", "empty.pt"), ("empty.pt",)),
    (("eval", "v2.pt"), ("v2.pt", "version")),
    (("eval", "no_model.pt"), ("no_model.pt", "model_config")),
    (("export", "no_model.pt", "--out", "new_deploy"), ("no_model.pt", "model_config")),
    (("train", "--resume", "no_train.pt"), ("no_train.pt", "cannot be resumed")),
    # more options out of range, and outputs under a file
    ((*SYN, "--val-split", "-0.1"), ("--val-split",)),
    ((*SYN, "--threads", "-2"), ("--threads",)),
    (("export", "run/best.pt", "--out", "a_file/deploy"), ("a_file",)),
    (("eval", "run/best.pt", "--json", "a_file/eval.json"), ("--json", "a_file")),
    (("bench", M, "--out", "a_file/bench"), ("--out", "a_file")),
    (("train", "--dataset", "synthetic", "--out", "a_file/run"), ("--out", "a_file")),
    # outputs under a folder that cannot be made: refused before the work, not after it
    (("eval", "run/best.pt", "--json", "/proc/nope/x.json"), ("--json", "/proc/nope")),
    (("eval", "run/best.pt", "--save-logits", "/proc/nope/x.npz"),
     ("--save-logits", "/proc/nope")),
    (("calibrate", M, "--logits", "val.npz", "--plot", "/proc/nope/c.png"),
     ("--plot", "/proc/nope")),
    (("export", "run/best.pt", "--out", "/proc/nope/deploy"), ("--out", "/proc/nope")),
    (("bench", M, "--out", "/proc/nope/bench"), ("--out", "/proc/nope")),
    (("train", "--dataset", "synthetic", "--out", "/proc/nope/run"), ("--out", "/proc/nope")),
    (("triton-repo", M, "--out", "/proc/nope/repo"), ("--out", "/proc/nope")),
    # a TensorRT profile out of order, whatever the format
    (("export", "run/best.pt", "--batch-range", "8,1,32", "--out", "new_deploy"),
     ("--batch-range", "min <= opt <= max", "8,1,32")),
    # file paths outside the manifest's folder
    (("predict", "dotdot/manifest.json", IMG), ("outside its folder", "../deploy/")),
    (("predict", "abs_path/manifest.json", IMG), ("outside its folder", "no absolute path")),
    (("predict", "dotdot/manifest.json", IMG, "--backend", "torch"), ("outside its folder",)),
    (("triton-repo", "dotdot/manifest.json", "--mode", "inprocess", "--out", "new_repo"),
     ("outside its folder",)),
]


@pytest.mark.parametrize("args,needles", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(workspace, monkeypatch, args,
                                                          needles):
    import byot_edge.cli.serve as serve_cli

    def started(*a, **kw):
        raise AssertionError("the server started")

    monkeypatch.setattr(serve_cli, "run_uvicorn", started)  # a case that gets this far would hang
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    r = runner.invoke(app, list(args))
    out = r.output
    assert r.exit_code == 2, f"exit {r.exit_code}: {out}\n{r.exception!r}"
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, out
    assert _snapshot(workspace) == before
    assert not (workspace / "pwned").exists()


def test_csv_values_one_parser_for_every_list_option() -> None:
    from byot_edge.cli.app import csv_values
    from byot_edge.errors import ByotError

    assert csv_values("1, 8,32,", int, "--batch", "positive integers", minimum=1) == [1, 8, 32]
    assert csv_values("0.9,0.5", float, "--threshold", "numbers") == [0.9, 0.5]
    assert csv_values(" ", int, "--feature-exits", "exit numbers", empty_ok=True) == []
    for text, kw in (("", {}), (",", {}), ("1,x", {}), ("0,1", {"minimum": 1}),
                     ("1,2", {"count": 3}), ("1,2,3,4", {"count": 3})):
        with pytest.raises(ByotError, match=r"^--opt takes what it takes like 1,2, got "):
            csv_values(text, int, "--opt", "what it takes like 1,2", **kw)


def test_triton_repo_writes_nothing_outside_the_repository(tmp_path) -> None:
    # load_manifest refuses paths that leave the deploy folder; the repository's writer
    # also refuses any destination outside the repository, whatever the path came from.
    from byot_edge.errors import ByotError
    from byot_edge.fileio import sha256_file
    from byot_edge.triton.repository import _Writer

    (tmp_path / "repo").mkdir()
    src = tmp_path / "file.onnx"
    src.write_bytes(b"model")
    writer = _Writer(tmp_path / "repo")
    for dest in (tmp_path / "repo" / "byot" / "1" / "deploy" / ".." / ".." / ".." / ".." / "x",
                 Path("/tmp") / "byot-edge-never-written"):
        with pytest.raises(ByotError, match="outside the repository"):
            writer.copy(src, dest, sha256_file(src))
        with pytest.raises(ByotError, match="outside the repository"):
            writer.text(dest, "text")
        assert not dest.exists()
    writer.copy(src, tmp_path / "repo" / "byot" / "1" / "deploy" / "file.onnx", sha256_file(src))
    assert writer.files == {"byot/1/deploy/file.onnx": sha256_file(src)}


@pytest.mark.parametrize("args", [("calibrate", M, "--logits", "val.npz"), ("profile", M)],
                         ids=["calibrate", "profile"])
def test_a_manifest_folder_that_cannot_be_written_is_refused_before_the_work(
        workspace, monkeypatch, args) -> None:
    # calibrate and profile rewrite the manifest when they are done: a read-only deploy
    # folder (as root, os.access is the kernel's word on it) is named first, not after.
    import os

    import byot_edge.calibrate
    import byot_edge.runtime.profile

    real = os.access
    deploy = (workspace / "deploy").absolute()
    monkeypatch.setattr("byot_edge.fileio.os.access",
                        lambda p, mode: Path(p) != deploy and real(p, mode))

    def work(*a, **kw):
        raise AssertionError("the work started")

    monkeypatch.setattr(byot_edge.calibrate, "calibrate_manifest", work)
    monkeypatch.setattr(byot_edge.runtime.profile, "profile_backend", work)
    monkeypatch.chdir(workspace)
    r = runner.invoke(app, list(args))
    assert r.exit_code == 2, r.output
    assert "deploy is not writable" in r.output and "Traceback" not in r.output
