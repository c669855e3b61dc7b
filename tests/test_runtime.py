"""The anytime runtime on a really exported model (export_checkpoint on make_checkpoint)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_checkpoint
from PIL import Image
from typer.testing import CliRunner

from byot_edge.calibrate import calibrate_manifest
from byot_edge.checkpoint import load_checkpoint, save_checkpoint
from byot_edge.cli import app
from byot_edge.errors import ByotError
from byot_edge.export.exporter import export_checkpoint
from byot_edge.manifest import LatencyProfile, Thresholds, load_manifest
from byot_edge.models import model_from_config
from byot_edge.plans import Plan
from byot_edge.profiles import ExitTiming
from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
from byot_edge.runtime.backends import get_backend
from byot_edge.runtime.latency import resolve, select_profile
from byot_edge.runtime.policies import (
    NEVER,
    ConfidenceThresholds,
    confidence,
    simulate,
    softmax,
)
from byot_edge.timing import Stats

BACKENDS = ["onnxruntime", "torch"]
runner = CliRunner()


def images(n: int, seed: int) -> torch.Tensor:
    """Inputs with per-sample contrast and brightness, so the exits disagree and vary."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 3, 1, 1, generator=g) * 2
    shift = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 4
    return torch.randn(n, 3, 32, 32, generator=g) * scale + shift


def trained_like_checkpoint(path: Path) -> Path:
    """make_checkpoint, with each exit's classifier standardised on the features it sees:
    an untrained net's shallow exits otherwise give the same near-uniform answer to every
    input, and a cascade test on them would test nothing."""
    ckpt = make_checkpoint(path)
    state = load_checkpoint(ckpt)
    model = model_from_config(state["model_config"])
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        for head, f in zip(model.heads, model(images(256, seed=1)).features, strict=True):
            w = head.fc.weight / (f.std(0) + 1e-6) * 2.0
            head.fc.weight.copy_(w)
            head.fc.bias.copy_(-(w @ f.mean(0)))
    state["model"] = model.state_dict()
    return save_checkpoint(ckpt, state)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Two OpenMP threads on two shared, busy cores spin against each other (100x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load(path: Path, backend: str = "onnxruntime") -> AnytimeModel:
    return AnytimeModel.load(path, backend=backend, threads=1)


@dataclass
class Deployed:
    root: Path  # the exported folder (do not modify: copy it with `fresh`)
    x: np.ndarray  # validation inputs [N, 3, 32, 32]
    logits: np.ndarray  # [K, N, C], PyTorch's, as `byot-edge eval --save-logits` writes
    labels: np.ndarray
    logits_path: Path


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    tmp = tmp_path_factory.mktemp("deployed")
    ckpt = trained_like_checkpoint(tmp / "model.pt")
    # TorchScript capture: the same files for the runtime, 15x faster than dynamo here.
    export_checkpoint(ckpt, tmp / "deploy", segments=True, exporter="torchscript")
    state = load_checkpoint(ckpt)
    model = model_from_config(state["model_config"])
    model.load_state_dict(state["model"])
    x = images(96, seed=2)
    with torch.no_grad():
        logits = torch.stack(model.eval()(x).logits).numpy()
    # Labels the exits' ensemble agrees on (10% flipped): confident shallow answers tend to
    # be right, as in a trained model, so calibration uses every exit.
    rng = np.random.default_rng(0)
    labels = sum(softmax(z) for z in logits).argmax(1)
    noisy = rng.random(len(labels)) < 0.1
    labels[noisy] = rng.integers(0, logits.shape[2], noisy.sum())
    path = tmp / "val_logits.npz"
    np.savez(path, logits=logits, labels=labels.astype(np.int64), split="val",
             dataset="synthetic", exits=np.arange(1, len(logits) + 1))
    return Deployed(tmp / "deploy", x.numpy(), logits, labels, path)


@pytest.fixture
def fresh(deployed: Deployed, tmp_path: Path) -> Path:
    """A private copy of the exported folder, for tests that write into the manifest."""
    return Path(shutil.copytree(deployed.root, tmp_path / "deploy")) / "manifest.json"


def median_thresholds(logits: np.ndarray) -> list[float]:
    """Per shallow exit, a threshold halfway between the two middle scores: about half the
    samples reaching each exit leave there, and no score sits near a threshold."""
    out = []
    for z in logits[:-1]:
        s = np.sort(confidence(z))
        mid = len(s) // 2
        out.append(float((s[mid - 1] + s[mid]) / 2))
    return out


class Spy:
    """Wraps a backend's run to record (artifact, batch size) of every call."""

    def __init__(self, model: AnytimeModel) -> None:
        self.calls: list[tuple[str, int]] = []
        inner = model.backend.run

        def run(name: str, inputs: dict) -> dict:
            self.calls.append((name, len(next(iter(inputs.values())))))
            return inner(name, inputs)

        model.backend.run = run  # type: ignore[method-assign]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cascade_equals_offline_simulation(deployed: Deployed, fresh: Path, backend: str) -> None:
    # Thresholds chosen by calibration on the validation logits...
    cal = calibrate_manifest(fresh, deployed.logits_path, max_drop=2.0)
    with load(fresh, backend) as model:
        result = model.run(deployed.x)  # ...that the model now reads from its manifest
        policy = ConfidenceThresholds(cal.chosen.thresholds, cal.criterion)
        sim = simulate(deployed.logits, policy)
        assert result.mode == "cascade"
        assert len(set(sim.exits.tolist())) >= 3  # the calibrated cascade uses early exits
        assert (result.exits == sim.exits).all()
        assert (result.indices == sim.predictions).all()
        # And hand-set thresholds that send samples to every exit.
        ths = median_thresholds(deployed.logits)
        result = model.run(deployed.x, PredictOptions(threshold=ths))
        sim = simulate(deployed.logits, ConfidenceThresholds.for_model(ths, model.num_exits))
        assert sorted(set(sim.exits.tolist())) == [1, 2, 3, 4]
        assert (result.exits == sim.exits).all()
        assert (result.indices == sim.predictions).all()
        assert [n for _, n in result.calls] == [n for _, n in sim.steps]


def test_a_static_batch_export_serves_any_batch(deployed: Deployed, tmp_path: Path) -> None:
    # `export --batch 8 --segments`: files that take exactly 8 samples, under a cascade that
    # hands each step only the samples still undecided, and a warm-up at batch 1.
    ckpt = trained_like_checkpoint(tmp_path / "model.pt")  # the same network as `deployed`
    export_checkpoint(ckpt, tmp_path / "static", segments=True, batch=8, exporter="torchscript")
    model = load(tmp_path / "static")
    model.warmup(1)
    ths = median_thresholds(deployed.logits)
    for n in (1, 3, 8, 13):
        x = deployed.x[:n]
        result = model.run(x, PredictOptions(threshold=ths))
        sim = simulate(deployed.logits[:, :n], ConfidenceThresholds.for_model(ths, 4))
        assert (result.exits == sim.exits).all() and (result.indices == sim.predictions).all()
        assert [p.index for p in model.predict(x, exit=2)] == \
            deployed.logits[1, :n].argmax(1).tolist()


def test_cascade_stops_early_and_compacts_the_batch(deployed: Deployed) -> None:
    model = load(deployed.root, "onnxruntime")
    spy = Spy(model)
    n = len(deployed.x)
    # Everyone confident at exit 1: segment 1 only, once.
    result = model.run(deployed.x, PredictOptions(threshold=0.0))
    assert spy.calls == [("segment1", n)]
    assert result.exits == [1] * n
    # No one can be confident at any exit computed: every segment on the full batch (the
    # worst case of a plan with every exit on)...
    spy.calls.clear()
    never = ConfidenceThresholds.for_model(NEVER, 4)
    worst = model.run_policy(deployed.x, never, plan=(1, 2, 3, 4))
    assert spy.calls == [(f"segment{k}", n) for k in range(1, 5)]
    assert worst.exits == [4] * n
    assert [k for k, _ in worst.step_ms] == [1, 2, 3, 4]  # when each step ended
    assert all(0 < a < b for (_, a), (_, b) in itertools.pairwise(worst.step_ms))
    assert worst.latency_ms[0] == worst.step_ms[-1][1]
    # (without a plan, exits that are off are not computed: one span, no branches)
    spy.calls.clear()
    model.run_policy(deployed.x, never)
    assert spy.calls == [("span1-4", n)]
    # ...which a request with every exit off avoids by running the full network alone.
    spy.calls.clear()
    full = model.run(deployed.x, PredictOptions(threshold=NEVER))
    assert spy.calls == [("exit4", n)]
    assert full.indices == worst.indices
    # The slowest path of a cascade whose exit 3 answers everyone (threshold 0) ends there.
    spy.calls.clear()
    stops_at_3 = ConfidenceThresholds.for_model([0.5, NEVER, 0.0], 4)
    slowest = model.run_policy(deployed.x, stops_at_3.worst_case(),
                               plan=stops_at_3.active_exits(4))
    assert spy.calls == [("segment1", n), ("span2-3", n)]
    assert slowest.exits == [3] * n
    # Median thresholds: each segment runs only on the samples still undecided.
    spy.calls.clear()
    ths = median_thresholds(deployed.logits)
    result = model.run(deployed.x, PredictOptions(threshold=ths))
    reached = [sum(e >= k for e in result.exits) for k in range(1, 5)]
    assert spy.calls == [(f"segment{k}", r) for k, r in enumerate(reached, start=1)]
    assert reached[0] > reached[1] > reached[2] > reached[3] > 0
    # Answers keep the input order: a permuted batch gives permuted answers.
    perm = np.random.default_rng(1).permutation(n)
    again = model.run(deployed.x[perm], PredictOptions(threshold=ths))
    assert again.exits == np.asarray(result.exits)[perm].tolist()
    assert again.indices == np.asarray(result.indices)[perm].tolist()
    # Earlier answers are never slower than later ones in the same request.
    order = np.argsort(result.exits, kind="stable")
    assert (np.diff(np.asarray(result.latency_ms)[order]) >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_exits_switched_off_are_skipped_branches_and_all(
        deployed: Deployed, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ths = median_thresholds(deployed.logits)
    ths[1] = ths[2] = NEVER  # exits 2 and 3 off: segment 1, then sections 2..4 as one span
    sim = simulate(deployed.logits, ConfidenceThresholds.for_model(ths, 4))
    with load(deployed.root, backend) as model:
        spy = Spy(model)
        result = model.run(deployed.x, PredictOptions(threshold=ths))
        later = int((sim.exits == 4).sum())
        assert spy.calls == [("segment1", len(deployed.x)), ("span2-4", later)]
        assert 0 < later < len(deployed.x)
        assert (result.exits == sim.exits).all()
        assert (result.indices == sim.predictions).all()
        backend_class = type(model.backend)
    # A backend that cannot join segments (TensorRT engines) runs them one by one and
    # ignores the logits of the exits that are off: the same answers.
    monkeypatch.setattr(backend_class, "joins_segments", False)
    with load(deployed.root, backend) as model:
        spy = Spy(model)
        again = model.run(deployed.x, PredictOptions(threshold=ths))
        assert spy.calls == [("segment1", len(deployed.x))] + [
            (f"segment{k}", later) for k in (2, 3, 4)]
        assert again.exits == result.exits
        assert again.indices == result.indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_exit_answers_like_that_exit(deployed: Deployed, backend: str) -> None:
    model = load(deployed.root, backend)
    for k in range(1, model.num_exits + 1):
        preds = model.predict(deployed.x, exit=k)
        assert [p.exit for p in preds] == [k] * len(deployed.x)
        assert [p.index for p in preds] == deployed.logits[k - 1].argmax(1).tolist()
        assert [p.label for p in preds] == [f"class{i}" for i in deployed.logits[k - 1].argmax(1)]
        conf = confidence(deployed.logits[k - 1])
        assert np.allclose([p.confidence for p in preds], conf, atol=1e-5)


def reference_softmax(logits: np.ndarray) -> np.ndarray:
    """The runtime's softmax written the plain way: shift, exp, sum first class to last,
    normalise."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / np.add.accumulate(e, axis=-1)[..., -1:]


def test_answers_are_the_logits_scored_bit_for_bit(deployed: Deployed) -> None:
    # The fast paths (one exit answering everyone, the policy's softmax reused for the
    # answers, Python floats for small batches) must give what scoring each step's logits
    # the plain way gives.
    model = load(deployed.root, "onnxruntime")
    outputs: list[np.ndarray] = []
    inner = model.backend.run

    def run(name: str, inputs: dict) -> dict:
        out = inner(name, inputs)
        outputs.append(out[model.backend.load(name).logits])
        return out

    model.backend.run = run  # type: ignore[method-assign]
    options_list = (PredictOptions(exit=2), PredictOptions(threshold=0.0),
                    PredictOptions(threshold=median_thresholds(deployed.logits)))
    for x in (deployed.x, deployed.x[:3]):  # numpy's softmax and the Python floats'
        for options in options_list:
            outputs.clear()
            result = model.run(x, options)
            preds = result.predictions(model.class_names)
            assert result.probabilities is not None
            assert result.probabilities.dtype == np.float64
            assert {type(v) for v in result.indices + result.exits} == {int}
            assert {type(v) for v in result.confidences + result.latency_ms} == {float}
            # Each call ran on the samples not answered before it, in input order.
            running = np.arange(len(x))
            exits, probabilities = np.asarray(result.exits), result.probabilities
            for (k, _), z in zip(result.step_ms or [(options.exit, 0.0)], outputs, strict=True):
                here = exits[running] == k
                p = reference_softmax(z[here])
                assert np.array_equal(probabilities[running[here]], p)
                assert np.array_equal(np.asarray(result.confidences)[running[here]],
                                      p.max(axis=-1))
                assert np.array_equal(np.asarray(result.indices)[running[here]],
                                      z[here].argmax(axis=-1))
                running = running[~here]
            assert len(running) == 0
            assert [p.confidence for p in preds] == result.confidences
            # predict() leaves the probabilities out, and answers the same.
            assert model.run(x, options, probabilities=False).probabilities is None
            again = model.predict(x, threshold=options.threshold, exit=options.exit)
            assert [(p.index, p.confidence, p.exit) for p in again] == [
                (p.index, p.confidence, p.exit) for p in preds]


def test_onnxruntime_workers_sleep_unless_told_to_spin(deployed: Deployed) -> None:
    for spin, want in ((None, "0"), (False, "0"), (True, "1")):
        options = {} if spin is None else {"spin": spin}
        model = AnytimeModel.load(deployed.root, backend="onnxruntime", threads=2, **options)
        session_options = model.backend._options  # type: ignore[attr-defined]
        for pool in ("intra_op", "inter_op"):
            assert session_options.get_session_config_entry(
                f"session.{pool}.allow_spinning") == want
    got = model.run(deployed.x[:4], PredictOptions(exit=1))
    want_result = load(deployed.root).run(deployed.x[:4], PredictOptions(exit=1))
    assert got.indices == want_result.indices
    assert np.allclose(got.confidences, want_result.confidences, atol=1e-6)


def test_finite_batches_pass_whatever_their_sum(deployed: Deployed) -> None:
    model = load(deployed.root, "onnxruntime")
    for n in (2, 4):  # below and above the size up to which x.x is the check (BLAS's)
        huge = np.full((n, 3, 32, 32), 3e38, np.float32)  # finite, but x.x overflows
        assert len(model.predict(huge, exit=1)) == n
        for bad in (np.nan, np.inf, -np.inf):
            x = np.zeros((n, 3, 32, 32), np.float32)
            x[n - 1, 2, 31, 31] = bad
            with pytest.raises(ByotError, match=rf"sample\(s\) \[{n - 1}\].*NaN or inf"):
                model.predict(x, exit=1)
    odd = np.asfortranarray(deployed.x[:2])  # not C-contiguous: copied, then accepted
    assert [p.index for p in model.predict(odd, exit=1)] == [
        p.index for p in model.predict(deployed.x[:2], exit=1)]


def test_input_checks_name_what_the_manifest_expects(deployed: Deployed) -> None:
    model = load(deployed.root, "onnxruntime")
    x = deployed.x[:2]
    bad = {
        "one image": (x[0], r"x\[None\]"),
        "nhwc": (x.transpose(0, 2, 3, 1).copy(), "NHWC"),
        "size": (np.zeros((2, 3, 28, 28), np.float32), r"\[N, 3, 32, 32\]"),
        "channels": (np.zeros((2, 1, 32, 32), np.float32), r"\[N, 3, 32, 32\]"),
        "uint8": (np.zeros((2, 3, 32, 32), np.uint8), "normalise"),
        "float64": (x.astype(np.float64), "astype"),
        "empty": (x[:0], "empty"),
        "list": (x.tolist(), "numpy array"),
    }
    for name, (batch, pattern) in bad.items():
        with pytest.raises(ByotError, match=pattern):
            model.predict(batch)
        assert name
    nan = x.copy()
    nan[1, 0, 0, 0] = np.nan
    inf = x.copy()
    inf[0, 2, 5, 5] = np.inf
    with pytest.raises(ByotError, match=r"sample\(s\) \[1\].*NaN or inf"):
        model.predict(nan)
    with pytest.raises(ByotError, match=r"sample\(s\) \[0\]"):
        model.predict(inf)
    with pytest.raises(ByotError, match=r"exits 1\.\.4"):
        model.predict(x, exit=5)
    with pytest.raises(ByotError, match="either exit"):
        model.predict(x, exit=2, threshold=0.5)
    # A torch tensor is accepted as well.
    assert len(model.predict(torch.from_numpy(x), exit=1)) == 2


def _profile(backend: str, device: str, truncated: list[float], segment: list[float],
             batch: int = 1) -> LatencyProfile:
    def stats(ms: float) -> Stats:
        return Stats(p50=ms / 2, p90=ms, p99=ms * 2, mean=ms, runs=5)

    exits = [ExitTiming(k, truncated=stats(t), segment=stats(s))
             for k, (t, s) in enumerate(zip(truncated, segment, strict=True), start=1)]
    return LatencyProfile(backend, device, batch, exits, "2026-01-01T00:00:00+00:00")


def test_budget_picks_the_deepest_exit_the_profile_fits(fresh: Path) -> None:
    m = load_manifest(fresh)
    model = load(fresh, "onnxruntime")
    with pytest.raises(ByotError, match="byot-edge profile"):
        model.predict(np.zeros((1, 3, 32, 32), np.float32), budget_ms=5.0)
    m.latency_profiles = [_profile("onnxruntime", model.backend.device,
                                   [10, 20, 30, 40], [10, 10, 10, 10])]
    m.save()
    model = load(fresh, "onnxruntime")
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert {p.exit for p in model.predict(x, budget_ms=25, stat="p90")} == {2}
    # A batch of 3 with only a batch-1 profile: latencies scaled by 3 (30, 60, 90, 120).
    assert {p.exit for p in model.predict(np.zeros((3, 3, 32, 32), np.float32),
                                          budget_ms=65, stat="p90")} == {2}
    assert {p.exit for p in model.predict(x, budget_ms=1000, stat="p90")} == {4}
    # The default is p50 (17.5 for exit 4): a p90 taken under load fits no budget.
    assert {p.exit for p in model.predict(x, budget_ms=35)} == {4}
    with pytest.warns(RuntimeWarning, match="no exit fits"):
        assert {p.exit for p in model.predict(x, budget_ms=1)} == {1}
    # A profile of another device is used, with a warning naming it.
    m.latency_profiles = [_profile("onnxruntime", "cuda (Some GPU)", [10, 20, 30, 40],
                                   [10, 10, 10, 10])]
    m.save()
    model = load(fresh, "onnxruntime")
    with pytest.warns(RuntimeWarning, match="Some GPU"):
        assert {p.exit for p in model.predict(x, budget_ms=25, stat="p90")} == {2}


def test_a_batch_between_two_profiled_sizes_is_priced_between_them(fresh: Path) -> None:
    m = load_manifest(fresh)
    device = load(fresh, "onnxruntime").backend.device
    one = _profile("onnxruntime", device, [10, 20, 30, 40], [10, 10, 10, 10])
    five = dataclasses.replace(_profile("onnxruntime", device, [50, 100, 150, 200],
                                        [50, 50, 50, 50]), batch=5)
    m.latency_profiles = [one, five]
    lat = resolve(select_profile(m, "onnxruntime", device, 3), "p90")
    # Half way from batch 1's figures to batch 5's, not batch 5's (which priced a batch of
    # 2 at 32's time and made a server shed what it could answer).
    assert lat.exits == [30, 60, 90, 120] and lat.segments == [30, 30, 30, 30]
    assert resolve(select_profile(m, "onnxruntime", device, 5), "p90").exits == [50, 100,
                                                                                   150, 200]
    m.save()
    model = load(fresh, "onnxruntime")
    assert {p.exit for p in model.predict(np.zeros((3, 3, 32, 32), np.float32),
                                          budget_ms=65, stat="p90")} == {2}


def test_a_profile_of_other_precision_files_is_not_taken_for_these(fresh: Path) -> None:
    m = load_manifest(fresh)
    model = load(fresh, "onnxruntime")
    int8 = _profile("onnxruntime", model.backend.device, [10, 20, 30, 40], [10] * 4)
    m.latency_profiles = [dataclasses.replace(int8, precision="int8")]
    m.save()
    model = load(fresh, "onnxruntime")  # these files are fp32
    x = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.warns(RuntimeWarning, match=r"\(int8 files\), not onnxruntime on .*\(fp32 files\)"):
        model.predict(x, budget_ms=25, stat="p90")
    # A profile from before profiles recorded their precision is taken as this one's.
    m.latency_profiles = [int8]
    m.save()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {p.exit for p in load(fresh).predict(x, budget_ms=25, stat="p90")} == {2}


def test_deadline_stops_before_overrunning_the_budget(fresh: Path, deployed: Deployed) -> None:
    m = load_manifest(fresh)
    model = load(fresh, "onnxruntime")
    m.latency_profiles = [_profile("onnxruntime", model.backend.device,
                                   [1e3] * 4, [1e4, 1e4, 1e4, 1e4])]
    m.save()
    model = load(fresh, "onnxruntime")
    spy = Spy(model)
    # Exit 1 on (no sample is that sure), the others off: the next step, segments 2..4,
    # is profiled at 15 s p50, and a 5 s budget stops after segment 1.
    assert confidence(deployed.logits[0]).max() < 1.0
    result = model.run(deployed.x, PredictOptions(threshold=[1.0, NEVER, NEVER], budget_ms=5e3))
    assert result.mode == "deadline"
    assert set(result.exits) == {1} and [c[0] for c in spy.calls] == ["segment1"]
    # The confident ones of a generous budget still leave early; the rest go to the end.
    ths = median_thresholds(deployed.logits)
    free = model.run(deployed.x, PredictOptions(threshold=ths))
    timed = model.run(deployed.x, PredictOptions(threshold=ths, budget_ms=1e9))
    assert free.exits == timed.exits


def test_a_deadline_computes_only_the_exits_that_are_on(fresh: Path, deployed: Deployed) -> None:
    ths = median_thresholds(deployed.logits)
    ths[0] = ths[2] = NEVER  # exits 1 and 3 off: sections 1..2 as one span, then 3..4
    m = load_manifest(fresh)
    model = load(fresh, "onnxruntime")
    m.latency_profiles = [_profile("onnxruntime", model.backend.device, [1.0] * 4, [1.0] * 4)]
    m.save()
    model = load(fresh, "onnxruntime")
    free = model.run(deployed.x, PredictOptions(threshold=ths))
    timed = model.run(deployed.x, PredictOptions(threshold=ths, budget_ms=1e9))
    # The same calls as the cascade without a deadline: no branch of an exit that is off.
    assert timed.calls == free.calls
    assert [name for name, _ in timed.calls] == ["span1-2", "span3-4"]
    assert timed.exits == free.exits


def test_a_deadline_prices_the_next_step_of_the_plan(fresh: Path, deployed: Deployed) -> None:
    ths = median_thresholds(deployed.logits)
    ths[0] = ths[2] = NEVER  # plan 2,4: after exit 2 the next step is segments 3 and 4
    m = load_manifest(fresh)
    model = load(fresh, "onnxruntime")
    m.latency_profiles = [_profile("onnxruntime", model.backend.device, [4e3] * 4,
                                   [1e3] * 4, batch=len(deployed.x))]  # 0.5 s a segment
    m.save()
    model = load(fresh, "onnxruntime")
    # A budget of 0.8 s would fit segment 3 after exit 2 (0.5 s p50, while the first step
    # takes less than 0.3 s), not segments 3 and 4 (1 s): everyone still running answers at
    # exit 2.
    result = model.run(deployed.x, PredictOptions(threshold=ths, budget_ms=800.0))
    assert set(result.exits) == {2}
    assert [name for name, _ in result.calls] == ["span1-2"]
    # A profiled span is preferred to the sum of its segments.
    m = load_manifest(fresh)
    d = m.latency_profiles[0].to_dict()
    d["exits"][3]["spans"] = {"3": {"p50": 10.0, "p90": 20.0, "p99": 40.0, "mean": 20.0,
                                    "runs": 5}}
    m.latency_profiles = [LatencyProfile.from_dict(d)]
    m.save()
    model = load(fresh, "onnxruntime")
    result = model.run(deployed.x, PredictOptions(threshold=ths, budget_ms=800.0))
    assert [name for name, _ in result.calls][-1] == "span3-4"


def test_deadline_without_a_profile_estimates_and_says_so(deployed: Deployed) -> None:
    model = load(deployed.root, "onnxruntime")
    assert confidence(deployed.logits[:-1]).max() < 1.0  # every exit on, none answers
    with pytest.warns(RuntimeWarning, match="no segment latency profile"):
        result = model.run(deployed.x, PredictOptions(threshold=1.0, budget_ms=1e9))
    assert set(result.exits) == {4}


def test_calibrated_thresholds_are_the_default(fresh: Path, deployed: Deployed) -> None:
    model = load(fresh, "onnxruntime")
    with pytest.warns(RuntimeWarning, match="byot-edge calibrate"):
        assert {p.exit for p in model.predict(deployed.x[:4])} == {4}
    m = load_manifest(fresh)
    ths = median_thresholds(deployed.logits)
    m.thresholds = Thresholds("max_softmax", ths)
    m.save()
    model = load(fresh, "onnxruntime")
    result = model.run(deployed.x)
    explicit = model.run(deployed.x, PredictOptions(threshold=ths))
    assert result.exits == explicit.exits
    with pytest.raises(ByotError, match="thresholds are for max_softmax"):
        model.run(deployed.x, PredictOptions(criterion="entropy"))


def test_backend_errors_name_the_alternatives(deployed: Deployed, fresh: Path) -> None:
    m = load_manifest(deployed.root)
    with pytest.raises(ByotError, match="onnxruntime, tensorrt, torch"):
        get_backend("openvino", m)
    with pytest.raises(ByotError, match="cpu, cuda"):
        get_backend("onnxruntime", m, device="npu")
    # A file changed after export is refused with the re-export hint.
    seg = fresh.parent / "segment2.onnx"
    seg.write_bytes(seg.read_bytes() + b"\0")
    model = load(fresh, "onnxruntime")
    with pytest.raises(ByotError, match=r"sha256.*byot-edge export"):
        model.predict(deployed.x[:1], threshold=0.99)
    # Without segment files, a cascade says to re-export with --segments.
    m = load_manifest(fresh)
    for e in m.exits:
        e.files.pop("segment_onnx")
    m.save()
    model = load(fresh, "onnxruntime")
    assert model.predict(deployed.x[:1], exit=3)[0].exit == 3  # truncated files still serve
    with pytest.raises(ByotError, match="--segments"):
        model.predict(deployed.x[:1], threshold=0.5)


def test_predict_command_reads_images(deployed: Deployed, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # short relative paths: the table fits 80 columns
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, mode) in enumerate([((40, 50), "RGB"), ((32, 32), "RGB"), ((20, 20), "L")]):
        shape = (*size, 3) if mode == "RGB" else size
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
        paths.append(Path(f"img{i}.{'png' if i < 2 else 'jpg'}"))
        img.save(paths[-1])
    manifest = str(deployed.root / "manifest.json")
    args = ["predict", manifest, *map(str, paths)]
    result = runner.invoke(app, [*args, "--exit", "2", "--backend", "torch", "--threads", "1"])
    assert result.exit_code == 0, result.output
    for p in paths:
        assert str(p) in result.output
    rows = [line for line in result.output.splitlines() if "img" in line]
    assert len(rows) == 3 and all("│ 2 " in r for r in rows)
    result = runner.invoke(app, [*args, "--threshold", "0.0", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "cascade" in result.output
    result = runner.invoke(app, [*args, "--backend", "nope"])
    assert result.exit_code == 2 and "choose one of" in result.output


def test_images_follow_the_manifest_channels_and_size(tmp_path: Path) -> None:
    from byot_edge.manifest import InputSpec
    from byot_edge.runtime.preprocess import load_image, load_images

    rgb = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    gray = load_image(tmp_path / "a.png", InputSpec([1, 28, 28]))
    want = np.asarray(Image.fromarray(rgb).convert("L").resize((28, 28), Image.Resampling.BILINEAR))
    assert gray.shape == (1, 28, 28) and (gray[0] == want).all()
    spec = InputSpec([3, 16, 16], mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    batch = load_images([tmp_path / "a.png"] * 2, spec)
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == np.float32
    pixels = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.Resampling.BILINEAR))
    expect = (pixels[..., 1] / 255 - 0.4) / 0.25
    assert np.allclose(batch[1, 1], expect, atol=1e-6)
    with pytest.raises(ByotError, match="does not exist"):
        load_image(tmp_path / "missing.png", spec)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ByotError, match="cannot read"):
        load_image(tmp_path / "bad.png", spec)


def test_calibrate_command_writes_thresholds_and_keeps_the_rest(
        deployed: Deployed, fresh: Path, tmp_path: Path) -> None:
    before = json.loads(fresh.read_text())
    plot = tmp_path / "curve.png"
    result = runner.invoke(app, ["calibrate", str(fresh), "--logits", str(deployed.logits_path),
                                 "--max-drop", "2", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "→" in result.output and "exit 4 alone" in result.output
    after = json.loads(fresh.read_text())
    assert after.pop("thresholds")["criterion"] == "max_softmax"
    before.pop("thresholds", None)
    assert after == before
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    th = load_manifest(fresh).thresholds
    assert th is not None and len(th.values) == 3
    assert th.expected["accuracy"] >= th.expected["deepest_accuracy"] - 0.02 - 1e-9
    # Test-split logits are used but warned about.
    test_logits = tmp_path / "test_logits.npz"
    np.savez(test_logits, logits=deployed.logits, labels=deployed.labels, split="test",
             dataset="synthetic", exits=np.arange(1, 5))
    result = runner.invoke(app, ["calibrate", str(fresh), "--logits", str(test_logits),
                                 "--flops-budget", "12M", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "TEST split" in result.output and "dry run" in result.output
    # A worst-case bound of 1.0 leaves no branch on: every exit off.
    result = runner.invoke(app, ["calibrate", str(fresh), "--logits", str(deployed.logits_path),
                                 "--max-drop", "2", "--max-worst-case", "1.0"])
    assert result.exit_code == 0, result.output
    assert "worst case <= 1x" in result.output
    th = load_manifest(fresh).thresholds
    assert th is not None and all(v > 1 for v in th.values)
    assert th.expected["worst_case_flops"] == th.expected["deepest_flops"]
    result = runner.invoke(app, ["calibrate", str(fresh), "--logits", str(deployed.logits_path),
                                 "--max-worst-case", "0.5"])
    assert result.exit_code == 2 and "at least 1" in result.output


def test_profile_command_stores_every_exit_segment_and_span(deployed: Deployed,
                                                             fresh: Path) -> None:
    result = runner.invoke(app, ["profile", str(fresh), "--batch", "1,2", "--warmup", "1",
                                 "--runs", "3", "--threads", "1"])
    assert result.exit_code == 0, result.output
    profiles = load_manifest(fresh).latency_profiles
    assert [p.batch for p in profiles] == [1, 2]
    # The JSON layout in the manifest (read here as written), which the typed records
    # read and write back exactly.
    stored = json.loads(fresh.read_text())["latency_profiles"]
    assert [p.to_dict() for p in profiles] == stored
    assert [json.dumps(p.to_dict()) for p in profiles] == [json.dumps(d) for d in stored]
    assert profiles[0].plans[Plan((2, 4))][1].runs == 3
    for p in stored:
        assert p["backend"] == "onnxruntime" and p["device"].startswith("cpu")
        assert p["precision"] == "fp32"  # what the timed files compute in
        assert [e["exit"] for e in p["exits"]] == [1, 2, 3, 4]
        for e in p["exits"]:
            assert list(e)[:3] == ["exit", "truncated", "segment"]
            stats = [e["truncated"], e["segment"], *e.get("spans", {}).values()]
            assert sorted(e.get("spans", {})) == [str(i) for i in range(1, e["exit"])]
            for s in stats:
                assert s["runs"] == 3 and 0 < s["p50"] <= s["p90"] <= s["p99"]
        # The runtime's own cascade through every segment, recorded on the deepest exit...
        assert [("cascade" in e) for e in p["exits"]] == [False, False, False, True]
        runtime = p["exits"][-1]["cascade"]
        assert list(p["exits"][-1])[-2:] == ["plans", "cascade"]
        assert list(runtime) == ["p50", "p90", "p99", "mean", "runs"]
        assert runtime["runs"] == 3 and runtime["p50"] > 0
        # ...and every plan a calibration can choose, timed at the end of each of its steps.
        plans = p["exits"][-1]["plans"]
        assert sorted(plans) == sorted(["4", "1,4", "2,4", "3,4", "1,2,4", "1,3,4", "2,3,4",
                                        "1,2,3,4"])
        for key, steps in plans.items():
            assert len(steps) == len(key.split(","))
            assert all(s["runs"] == 3 for s in steps)
            assert steps[0]["p50"] > 0
            assert all(a["mean"] <= b["mean"] for a, b in itertools.pairwise(steps))
    assert "the runtime's cascade through every segment" in result.output
    # Profiling again replaces rather than piles up.
    runner.invoke(app, ["profile", str(fresh), "--batch", "1", "--warmup", "0", "--runs", "1"])
    assert [p.batch for p in load_manifest(fresh).latency_profiles] == [2, 1]
    # Calibration prices the cascade with the profile at the batch it is asked for.
    result = runner.invoke(app, ["calibrate", str(fresh), "--logits", str(deployed.logits_path),
                                 "--batch", "2", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "batch 2" in result.output
    result = runner.invoke(app, ["calibrate", str(fresh), "--logits", str(deployed.logits_path),
                                 "--batch", "7", "--dry-run"])
    assert result.exit_code != 0 and "no latency profile at batch 7" in result.output
