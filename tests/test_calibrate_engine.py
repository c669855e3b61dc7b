"""Calibration on the deployed engine: `calibrate --data-dir` runs the int8 files on the
validation split, the thresholds record whose logits they were fitted on, and the runtime
warns once when it serves thresholds fitted on another precision.

One tiny int8 folder (module-scoped: an untrained checkpoint trained, as it says, with a 0.1
validation split; TorchScript capture, 32 calibration images of the synthetic dataset);
tests that write thresholds work on a copy.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import make_checkpoint
from typer.testing import CliRunner

from byot_edge.calibrate import Calibration, calibrate_engine, load_logits
from byot_edge.calibrate.engine_logits import validation_arrays
from byot_edge.cli import app
from byot_edge.datasets import synthetic_arrays, train_val_split
from byot_edge.export.exporter import export_checkpoint
from byot_edge.manifest import load_manifest
from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.policies import confidence, exits_for_thresholds
from byot_edge.runtime.preprocess import normalise

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
K = 4


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("engcal")
    ckpt = make_checkpoint(tmp / "best.pt",
                           train_config={"method": "byot", "val_split": 0.1, "seed": 0})
    out = tmp / "deploy"
    export_checkpoint(ckpt, out, segments=True, precision="int8", calibration_images=32,
                      data_dir=tmp, int8_agreement=0.5, exporter="torchscript")
    return out


@pytest.fixture
def folder(int8_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(int8_folder, tmp_path / "deploy"))


@pytest.fixture(scope="module")
def calibrated(int8_folder: Path, tmp_path_factory) -> tuple[Path, Calibration]:
    """The folder with thresholds calibrated on its int8 files (a FLOPs budget halfway
    between exit 1 and the deepest, so the cascade answers at several exits)."""
    out = Path(shutil.copytree(int8_folder, tmp_path_factory.mktemp("cal") / "deploy"))
    flops = [e.flops for e in load_manifest(out).exits]
    cal = calibrate_engine(out / "manifest.json", out, threads=1,
                           save_logits=out / "engine.npz",
                           flops_budget=(flops[0] + flops[-1]) / 2)
    return out, cal


@pytest.fixture
def cal_folder(calibrated, tmp_path: Path) -> Path:
    return Path(shutil.copytree(calibrated[0], tmp_path / "deploy"))


def test_export_records_the_validation_split(int8_folder):
    val = load_manifest(int8_folder).validation
    assert (val.dataset, val.fraction, val.seed) == ("synthetic", 0.1, 0)
    data, what = validation_arrays(load_manifest(int8_folder), ".")
    # The very images `train` held out: train_val_split of the training split.
    _, idx = train_val_split(2000, 0.1, 0)
    assert np.array_equal(data.labels, synthetic_arrays(2000, seed=0).labels[idx])
    assert "200 images" in what


def test_cli_calibrates_on_the_int8_files_and_records_it(folder):
    r = runner.invoke(app, ["calibrate", str(folder / "manifest.json"), "--data-dir",
                            str(folder), "--backend", "onnxruntime", "--precision", "int8",
                            "--save-logits", str(folder / "engine.npz"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    th = load_manifest(folder).thresholds
    assert (th.backend, th.precision) == ("onnxruntime", "int8")
    assert "int8 files on the synthetic validation split" in th.source
    saved = load_logits(folder / "engine.npz")
    assert (saved.backend, saved.precision, saved.split) == ("onnxruntime", "int8", "val")
    assert saved.logits.shape[:2] == (K, 200)


def test_engine_thresholds_reproduce_the_offline_replay(calibrated):
    """The runtime's int8 cascade on the validation images answers each one at the exit,
    with the class, that the replay of the collected int8 logits gives."""
    folder, cal = calibrated
    val = load_logits(folder / "engine.npz")
    th = cal.chosen.thresholds
    scores = np.stack([confidence(val.logits[k], "max_softmax") for k in range(K - 1)])
    want_exit = exits_for_thresholds(scores, th)
    assert len(set(want_exit.tolist())) > 1  # a real cascade, not one exit for everyone
    want_class = val.logits[want_exit, np.arange(len(want_exit))].argmax(1)
    data, _ = validation_arrays(load_manifest(folder), folder)
    with AnytimeModel.load(folder, threads=1) as model:
        got = model.run(normalise(data.images, model.manifest.input))
    assert np.array_equal(got.exits, want_exit + 1)
    assert np.array_equal(got.indices, want_class)
    assert np.mean(got.indices == val.labels) == pytest.approx(cal.chosen.accuracy)


def _set_precision(folder: Path, precision: str) -> None:
    m = load_manifest(folder)
    m.thresholds = dataclasses.replace(m.thresholds, precision=precision, backend="torch")
    m.save()


def _caught(model: AnytimeModel, x: np.ndarray, runs: int = 2) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(runs):
            model.predict(x)
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_thresholds_of_another_precision_warn_once(cal_folder):
    folder = cal_folder
    x = normalise(synthetic_arrays(4, seed=5).images, load_manifest(folder).input)
    with AnytimeModel.load(folder, threads=1) as model:  # int8 thresholds, int8 files
        assert not [m for m in _caught(model, x) if "precision" in m]
        assert model.predict(x, threshold=0.5)  # request thresholds: nothing to warn about
    _set_precision(folder, "fp32")  # as an old manifest loads: fitted on PyTorch fp32
    with AnytimeModel.load(folder, threads=1) as model:
        said = [m for m in _caught(model, x, runs=3) if "precision" in m]
        assert len(said) == 1
        assert "calibrated on fp32 logits" in said[0] and "runs int8 files" in said[0]
        assert "--data-dir" in said[0]
        # Each answer still carries it (a server reports it per request).
        assert any("fp32 logits" in w for w in model.run(x).warnings)


def test_torch_backend_on_an_int8_folder_says_it_serves_fp32(calibrated):
    folder = calibrated[0]  # int8 thresholds
    x = normalise(synthetic_arrays(4, seed=5).images, load_manifest(folder).input)
    with AnytimeModel.load(folder, backend="torch") as model:
        said = _caught(model, x, runs=3)
    weights = [m for m in said if "fp32 weights" in m]
    assert len(weights) == 1 and "int8" in weights[0] and "--backend onnxruntime" in weights[0]
    # ... and the int8 thresholds on fp32 weights are the other mismatch, said once too.
    assert len([m for m in said if "calibrated on int8 logits" in m]) == 1


def test_old_thresholds_load_as_pytorch_fp32(cal_folder):
    import json

    folder = cal_folder
    d = json.loads((folder / "manifest.json").read_text())
    del d["thresholds"]["backend"], d["thresholds"]["precision"], d["validation"]
    (folder / "manifest.json").write_text(json.dumps(d))
    m = load_manifest(folder)
    assert (m.thresholds.backend, m.thresholds.precision) == ("torch", "fp32")
    assert m.validation is None


@pytest.mark.parametrize(("change", "args", "needles"), [
    (None, ["--precision", "fp16"], ("--precision fp16", "runs int8 files")),
    (None, ["--logits", "x.npz"], ("exactly one of --logits", "not both")),
    (None, ["--backend", "foo"], ("foo",)),
    (None, ["--backend", "torch", "--precision", "int8"], ("fp32 weights", "onnxruntime")),
    ("no_split", [], ("--val-split 0", "retrain")),
    ("no_record", [], ("does not record", "re-export")),
    ("cifar", [], ("validation split", "cifar-10-batches-py")),
])
def test_bad_engine_calibration_inputs_are_clear_errors(folder, tmp_path, change, args,
                                                        needles):
    import json

    d = json.loads((folder / "manifest.json").read_text())
    if change == "no_split":
        d["validation"]["fraction"] = 0
    elif change == "no_record":
        del d["validation"]
    elif change == "cifar":  # a folder without the training images the split is drawn from
        d["validation"]["dataset"] = "cifar10"
    (folder / "manifest.json").write_text(json.dumps(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["calibrate", str(folder / "manifest.json"), "--data-dir",
                            str(empty), *args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    flat = " ".join(r.output.split())
    for needle in needles:
        assert needle in flat, r.output
    assert "thresholds" not in json.loads((folder / "manifest.json").read_text()) or \
        json.loads((folder / "manifest.json").read_text())["thresholds"] is None


def test_static_batch_files_are_fed_whole_batches(tmp_path):
    """An fp32 export with a static --batch 64: the 200 validation images go in as four
    batches of 64, the last padded (ONNX Runtime refuses any other size), and come back as
    200 samples in the split's order."""
    ckpt = make_checkpoint(tmp_path / "best.pt",
                           train_config={"method": "byot", "val_split": 0.1, "seed": 0})
    out = tmp_path / "static"
    export_checkpoint(ckpt, out, segments=True, batch=64, exporter="torchscript")
    cal = calibrate_engine(out / "manifest.json", tmp_path, threads=1,
                           save_logits=tmp_path / "static.npz")
    val = load_logits(tmp_path / "static.npz")
    assert val.logits.shape[:2] == (K, 200) and cal.num_samples == 200
    assert (val.backend, val.precision) == ("onnxruntime", "fp32")
    data, _ = validation_arrays(load_manifest(out), tmp_path)
    assert np.array_equal(val.labels, data.labels)


def test_the_triton_cascade_knows_it_serves_int8_segments(cal_folder):
    # In BLS mode the cascade runs the repository's segment models, which are the folder's
    # int8 segment files: its thresholds' precision check must see int8, not assume fp32.
    from byot_edge.triton.bls import TritonBLSBackend

    def bls_model() -> AnytimeModel:
        manifest = load_manifest(cal_folder)
        return AnytimeModel(manifest, TritonBLSBackend(manifest, {}, pb_utils=None))

    model = bls_model()
    assert model.backend.files_precision() == "int8"
    assert model._backend_note is None  # it runs the int8 files, not the fp32 weights
    assert model._calibrated_precision_notes() == []  # int8 thresholds on int8 segments
    _set_precision(cal_folder, "fp32")
    notes = bls_model()._calibrated_precision_notes()
    assert len(notes) == 1 and "runs int8 files" in notes[0]
