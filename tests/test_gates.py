"""Learned exit gates (runtime/gates.py, calibrate/gate_fit.py): features, fitting, the
manifest round trip, and the runtime deciding exactly as calibration's replay."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from server_fixtures import deployed_model

from byot_edge.calibrate import Costs, ValLogits, calibrate, write_thresholds
from byot_edge.calibrate.candidates import Evaluator
from byot_edge.calibrate.engine_logits import _batch_logits
from byot_edge.calibrate.gate_fit import PlanFeatures, fit_logistic, plan_scores
from byot_edge.errors import ByotError
from byot_edge.manifest import load_manifest
from byot_edge.plans import Plan, all_plans
from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.gates import (
    FEATURES,
    GATE,
    ExitGates,
    Gate,
    gate_score,
    row_features,
)
from byot_edge.runtime.policies import NEVER, Softmax, simulate
from byot_edge.runtime.preprocess import load_images

COSTS = Costs([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], branch_flops=[0.2, 0.2, 0.2])


def logits(n: int = 600, k: int = 4, c: int = 10, seed: int = 0) -> ValLogits:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    easy = rng.uniform(0, 1, n)
    z = rng.standard_normal((k, n, c)).astype(np.float32)
    for j in range(k):
        z[j, np.arange(n), y] += (j + 1) * 1.2 * (1.1 - easy)
    return ValLogits(z, y, "val", "synthetic", Path("val.npz"))


def some_gates(k: int = 4, seed: int = 0) -> list[Gate]:
    rng = np.random.default_rng(seed)
    return [Gate(tuple(rng.normal(0, 2, len(FEATURES)).tolist()), float(rng.normal()))
            for _ in range(k - 1)]


@pytest.mark.parametrize("n", [1, 3, 64])  # Python floats (<= 100 logits) and numpy
def test_the_gates_probabilities_have_the_same_bits_in_any_batch(n: int) -> None:
    z = np.random.default_rng(1).standard_normal((n, 10)).astype(np.float32) * 4
    for t in (1.0, 1.7):
        whole = Softmax(z, t).exp_rows()
        assert [Softmax(z[i:i + 1], t).exp_rows()[0] for i in range(n)] == whole
        assert np.allclose(whole, Softmax(z, t).probabilities(), rtol=1e-14, atol=0)
        assert all(abs(sum(r) - 1) < 1e-12 for r in whole)


def test_row_features_at_the_first_exit_and_after() -> None:
    p = [0.7, 0.2, 0.1]
    f = row_features(p, [])
    assert len(f) == len(FEATURES)
    assert f[0] == 0.7 and f[1] == pytest.approx(0.5) and 0 < f[2] < 1
    assert f[3:6] == [1.0, 0.7, 1.0]
    g = row_features(p, [[0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    assert g[3] == 1.0  # the previous exit agrees
    assert g[4] == 0.6  # its probability of this exit's class
    assert g[5] == 0.5  # one of two earlier exits agrees
    assert g[6] == pytest.approx((0.7 + 0.1 + 0.6) / 3)


def test_gate_scores_stay_in_0_1_whatever_the_input() -> None:
    w = [1e6] * len(FEATURES)
    assert gate_score([1.0] * len(FEATURES), w, 0.0) == 1.0
    assert 0.0 <= gate_score([-1.0] * len(FEATURES), w, 0.0) < 1e-300  # no OverflowError
    assert gate_score([float("nan")] * len(FEATURES), w, 0.0) == 0.0


def test_logistic_fit_recovers_a_known_model() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, len(FEATURES)))
    true_w = np.linspace(-1, 1, len(FEATURES))
    y = rng.uniform(size=len(x)) < 1 / (1 + np.exp(-(x @ true_w + 0.3)))
    g = fit_logistic(x, y, l2=1e-3)
    assert np.allclose(g.weights, true_w, atol=0.1)
    assert g.bias == pytest.approx(0.3, abs=0.1)


@pytest.mark.parametrize("thresholds", [(0.5, 0.6, 0.4), (0.7, NEVER, 0.3),
                                        (NEVER, NEVER, 0.5), (0.0, 0.9, 0.9)])
def test_the_runtime_policy_decides_as_calibrations_replay(thresholds) -> None:
    val = logits()
    gates = some_gates()
    by_plan = plan_scores(PlanFeatures(val.logits), gates)
    pred = val.logits.argmax(axis=2)
    ev = Evaluator(by_plan[Plan.every_exit(4)], pred == val.labels, COSTS, pred == pred[-1:],
                   by_plan)
    cand = ev(thresholds, "t")
    policy = ExitGates.for_model(gates, thresholds, 4)
    sim = simulate(val.logits, policy)
    counts = np.bincount(sim.exits - 1, minlength=4) / len(val.labels)
    assert counts.tolist() == pytest.approx(list(cand.fractions), abs=0)
    assert float((sim.predictions == val.labels).mean()) == cand.accuracy
    # One sample at a time, as the runtime meets them at batch 1: the same decisions.
    one = [simulate(val.logits[:, i:i + 1], policy).exits[0] for i in range(0, 600, 7)]
    assert one == sim.exits[::7].tolist()


def test_every_plan_is_scored() -> None:
    by_plan = plan_scores(PlanFeatures(logits(n=50).logits), some_gates())
    assert set(by_plan) == set(all_plans(4))
    # Exit 3's score depends on which earlier exits were computed.
    assert not np.array_equal(by_plan[Plan((1, 2, 3, 4))][2], by_plan[Plan((3, 4))][2])


def deploy_copy(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    src = deployed_model(tmp_path_factory).manifest.parent
    return Path(shutil.copytree(src, tmp_path / "deploy"))


def test_gates_round_trip_through_the_manifest(tmp_path_factory, tmp_path: Path) -> None:
    folder = deploy_copy(tmp_path_factory, tmp_path)
    m = load_manifest(folder)
    k, c = m.num_exits, len(m.class_names)
    val = logits(n=800, k=k, c=c)
    cal = calibrate(val, Costs([1.0] * k, [1.0] * k), criterion=GATE, max_drop=1.0, delta=0.2)
    write_thresholds(m, cal, "synthetic")
    again = load_manifest(folder)
    th = again.thresholds
    assert th is not None and th.criterion == GATE and th.guarantee is not None
    assert th.guarantee["delta"] == 0.2 and th.guarantee["method"] == "ltt"
    assert [Gate.from_dict(g) for g in th.gates or []] == cal.gates
    with AnytimeModel.load(folder / "manifest.json", threads=1) as model:
        policy = model.threshold_policy()
        assert isinstance(policy, ExitGates)
        assert policy.gates == tuple(cal.gates or ()) and policy.values == cal.chosen.thresholds
        # A request's thresholds go to the same gates.
        assert model.threshold_policy(0.5).gates == policy.gates  # type: ignore[union-attr]


@pytest.mark.parametrize(("edit", "words"), [
    (lambda th: th.update(gates=th["gates"][:-1]), "gates"),
    (lambda th: th.update(criterion="max_softmax"), "gates go with criterion 'gate'"),
    (lambda th: th.update(gates=None), "gates go with criterion 'gate'"),
])
def test_a_manifest_whose_gates_do_not_fit_is_refused_in_one_line(
        tmp_path_factory, tmp_path: Path, edit, words: str) -> None:
    folder = deploy_copy(tmp_path_factory, tmp_path)
    raw = json.loads((folder / "manifest.json").read_text())
    k = len(raw["exits"])
    raw["thresholds"] = {"criterion": GATE, "values": [0.5] * (k - 1),
                         "gates": [g.as_dict() for g in some_gates(k)]}
    edit(raw["thresholds"])
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ByotError, match=words) as e:
        load_manifest(folder)
    assert "\n" not in str(e.value)


def test_a_gate_of_another_size_is_refused_when_the_policy_is_built() -> None:
    with pytest.raises(ByotError, match=f"take {len(FEATURES)}"):
        Gate.from_dict({"weights": [1.0, 2.0], "bias": 0.0})
    with pytest.raises(ByotError, match="numeric"):
        Gate.from_dict({"weights": "x"})


def test_the_runtime_answers_as_the_replay_of_its_own_logits(tmp_path_factory) -> None:
    served = deployed_model(tmp_path_factory)
    with AnytimeModel.load(served.manifest, threads=1) as model:
        k = model.num_exits
        x = load_images(served.images, model.manifest.input)
        z = np.concatenate([_batch_logits(model.backend, x[i:i + 1]) for i in range(len(x))],
                           axis=1)
        gates = some_gates(k, seed=3)
        # Thresholds at each exit's median score: some samples leave, some go on.
        scores = plan_scores(PlanFeatures(z), gates)[Plan.every_exit(k)]
        for values in ([float(np.median(s)) for s in scores],
                       [float(np.median(scores[0])), NEVER, 0.0][:k - 1]):
            policy = ExitGates.for_model(gates, values, k)
            sim = simulate(z, policy)
            assert len(set(sim.exits.tolist())) > 1
            one = [model.run_policy(x[i:i + 1], policy) for i in range(len(x))]
            assert [r.exits[0] for r in one] == sim.exits.tolist()
            assert [r.indices[0] for r in one] == sim.predictions.tolist()
            whole = model.run_policy(x, policy)  # one batch, compacted step by step
            assert whole.exits == sim.exits.tolist()


def test_the_server_answers_with_the_manifests_gates(tmp_path_factory, tmp_path: Path) -> None:
    import io
    import time

    from fastapi.testclient import TestClient

    from byot_edge.runtime.server import ServeConfig, create_app

    served = deployed_model(tmp_path_factory)
    folder = deploy_copy(tmp_path_factory, tmp_path)
    m = load_manifest(folder)
    k = m.num_exits
    cal = calibrate(logits(n=800, k=k, c=len(m.class_names)), Costs([1.0] * k, [1.0] * k),
                    criterion=GATE, max_drop=1.0, delta=0.2)
    write_thresholds(m, cal, "synthetic")
    with AnytimeModel.load(folder / "manifest.json", threads=1) as model:
        x = load_images(served.images, model.manifest.input)
        want = model.run(x[:4]).exits
        buf = io.BytesIO()
        np.save(buf, x[:4])
        with TestClient(create_app(model, ServeConfig())) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            r = client.post("/v1/predict", content=buf.getvalue(),
                            headers={"Content-Type": "application/x-npy"})
            assert r.status_code == 200, r.text
            assert [p["exit"] for p in r.json()["predictions"]] == want
            info = client.get("/v1/model").json()
            assert info["thresholds"]["criterion"] == GATE
