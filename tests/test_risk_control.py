"""Risk-controlled calibration (calibrate/risk.py, calibrate/controlled.py): the bounds, the
guarantee over many draws of the calibration set, and the bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from byot_edge.binomial import binomial_cdf, lower_bound, upper_bound
from byot_edge.calibrate import Costs, ValLogits, calibrate, msdnet_thresholds
from byot_edge.calibrate.risk import RiskCounts, fixed_sequence, risk_bound, split_indices
from byot_edge.cli import app
from byot_edge.errors import ByotError
from byot_edge.manifest import THRESHOLD_OFF
from byot_edge.runtime.policies import NEVER, confidence, exits_for_thresholds

COSTS2 = Costs([1.0, 3.0], [1.0, 2.9])


def test_binomial_cdf_matches_a_direct_sum() -> None:
    from math import comb

    for n, p in ((20, 0.1), (50, 0.37), (7, 0.9)):
        for x in range(n + 1):
            direct = sum(comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(x + 1))
            assert binomial_cdf(x, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-15)


def test_clopper_pearson_limits() -> None:
    # x = 0: the upper limit solves (1 - p)^n = delta
    assert upper_bound(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert lower_bound(0, 100, 0.05) == 0.0
    assert upper_bound(100, 100, 0.05) == 1.0
    # The limits hold their level: at the limit, the tail has probability delta.
    u = upper_bound(7, 200, 0.1)
    assert binomial_cdf(7, 200, u) == pytest.approx(0.1, rel=1e-6)
    lo = lower_bound(7, 200, 0.1)
    assert 1 - binomial_cdf(6, 200, lo) == pytest.approx(0.1, rel=1e-6)
    assert lo < 7 / 200 < u


def test_clopper_pearson_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for x, n, d in ((3, 1000, 0.05), (40, 5000, 0.1), (0, 300, 0.2), (299, 300, 0.05)):
        assert upper_bound(x, n, d) == pytest.approx(stats.beta.ppf(1 - d, x + 1, n - x),
                                                     rel=1e-7)


def test_the_drop_bound_is_a_union_of_two_limits() -> None:
    c = RiskCounts(n=1000, lost=20, gained=10, disagree=45)
    assert c.empirical("drop") == pytest.approx(0.01)
    assert risk_bound(c, "drop", 0.1) == pytest.approx(
        upper_bound(20, 1000, 0.05) - lower_bound(10, 1000, 0.05))
    assert risk_bound(c, "disagreement", 0.1) == pytest.approx(upper_bound(45, 1000, 0.1))


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    seq = [RiskCounts(1000, d, 0, d) for d in (0, 1, 2, 30, 1, 0)]
    i, bound, tested = fixed_sequence(seq, "disagreement", 0.01, 0.1)
    assert (i, tested) == (2, 4)  # the later, safe-looking ones are never tested
    assert bound == pytest.approx(upper_bound(2, 1000, 0.1))
    assert fixed_sequence(seq[3:], "disagreement", 0.01, 0.1)[0] == -1


def test_the_order_puts_candidates_with_small_bounds_first() -> None:
    # The empirically least risky candidate loses and gains many answers (drop -0.2%) and
    # its bound is wide; a conservative one changes a few. Ordered by empirical risk, the
    # sequence would start, and stop, at the wide one; ordered by the bound, the
    # conservative one goes first and the cheaper ones get tested after it.
    from byot_edge.calibrate.candidates import Candidate
    from byot_edge.calibrate.controlled import risk_frontier

    def cand(cost: float, lost: int, gained: int) -> Candidate:
        return Candidate("t", (cost,), 0.0, cost, None, (0.5, 0.5),
                         risk=RiskCounts(2500, lost, gained, lost + gained))

    from types import SimpleNamespace

    ev = SimpleNamespace(seen={1: cand(0.9, 1, 0), 2: cand(0.8, 60, 65), 3: cand(0.6, 5, 2),
                               4: cand(0.5, 70, 40)})
    order = risk_frontier(ev, "drop", "flops", lambda c: True, 0.1)  # type: ignore[arg-type]
    assert [c.flops for c in order] == [0.9, 0.6, 0.5]
    i, _, _ = fixed_sequence([c.risk for c in order], "drop", 0.005, 0.1)  # type: ignore[misc]
    assert order[i].flops == 0.6


def population(n: int, seed: int) -> ValLogits:
    """Two exits: the deepest right 85% of the time; exit 1 right more often the more
    confident it is, so a threshold trades accuracy for cost with a known risk."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    conf = rng.uniform(0, 1, n)
    right1 = rng.uniform(0, 1, n) < 0.35 + 0.6 * conf
    right2 = rng.uniform(0, 1, n) < 0.85
    logits = np.zeros((2, n, 10), np.float32)
    for k, right in enumerate((right1, right2)):
        pred = np.where(right, y, (y + 1 + rng.integers(0, 9, n)) % 10)
        z = rng.standard_normal((n, 10)) * 0.05
        z[np.arange(n), pred] += 1.0 + (6.0 * conf if k == 0 else 3.0)
        logits[k] = z
    return ValLogits(logits, y, "val", "synthetic", Path("val.npz"))


class TrueDrop:
    """A threshold's drop on a population large enough to stand for the distribution."""

    def __init__(self, truth: ValLogits) -> None:
        self.score = confidence(truth.logits[0])
        right = truth.logits.argmax(axis=2) == truth.labels[None]
        self.right1, self.deepest_right = right[0], right[1]
        self.deepest = float(right[1].mean())

    def __call__(self, threshold: float) -> float:
        e = exits_for_thresholds(self.score[None], [threshold])
        cascade = np.where(e == 0, self.right1, self.deepest_right)
        return 100 * (self.deepest - float(cascade.mean()))


def test_a_guarantee_fails_at_most_delta_of_the_time_and_a_point_estimate_more() -> None:
    truth = population(200_000, seed=99)
    true_drop = TrueDrop(truth)
    draws, delta, target = 80, 0.2, 2.0
    failures = {"ltt": 0, "point": 0}
    for d in range(draws):
        sample = population(1500, seed=d)
        ltt = calibrate(sample, COSTS2, max_drop=target, delta=delta, seed=d, grid_size=50)
        point = calibrate(sample, COSTS2, max_drop=target, grid_size=50)
        failures["ltt"] += true_drop(ltt.chosen.thresholds[0]) > target
        failures["point"] += true_drop(point.chosen.thresholds[0]) > target
    # delta = 0.2 over 80 draws: about 16 failures at most in expectation (fewer in
    # practice: the bound is conservative); the point estimate sits on the target and
    # fails about half the time.
    assert failures["ltt"] <= 0.2 * draws + 6, failures
    assert failures["point"] >= 0.3 * draws, failures
    assert failures["ltt"] < failures["point"]


def test_the_disagreement_risk_needs_no_labels() -> None:
    val = population(3000, seed=1)
    shuffled = ValLogits(val.logits, np.random.default_rng(0).permutation(val.labels), "val",
                         "synthetic", Path("val.npz"))
    a = calibrate(val, COSTS2, max_drop=5, delta=0.1, risk="disagreement")
    b = calibrate(shuffled, COSTS2, max_drop=5, delta=0.1, risk="disagreement")
    assert a.chosen.thresholds == b.chosen.thresholds
    assert a.guarantee is not None and a.guarantee.bound == pytest.approx(b.guarantee.bound)
    assert a.guarantee.bound <= 0.05


def test_the_guarantee_is_recorded_with_its_bound() -> None:
    cal = calibrate(population(4000, seed=3), COSTS2, max_drop=2.0, delta=0.1)
    g = cal.guarantee
    assert g is not None
    assert (g.risk, g.delta, g.max_risk, g.fit_samples, g.test_samples) == (
        "drop", 0.1, 0.02, 2000, 2000)
    assert 0 < g.bound <= 0.02
    assert "probability >= 0.9" in cal.objective


def test_too_few_samples_answer_from_the_deepest_exit_and_say_so() -> None:
    cal = calibrate(population(60, seed=4), COSTS2, max_drop=0.5, delta=0.1)
    assert cal.chosen.thresholds == (NEVER,)
    assert any("no early exit could be certified" in n for n in cal.notes)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"max_drop": 1, "delta": 0.0}, "--delta"),
    ({"max_drop": 1, "delta": 1.0}, "--delta"),
    ({"max_drop": 1, "delta": float("nan")}, "--delta"),
    ({"flops_budget": 2.0, "delta": 0.1}, "--delta"),
    ({"max_drop": 1, "delta": 0.1, "risk": "loss"}, "unknown risk"),
    ({"max_drop": 1, "risk": "disagreement"}, "--delta"),
    ({"max_drop": 1, "delta": 0.1, "fit_fraction": 1.0}, "--fit-fraction"),
])
def test_bad_requests_get_one_clear_line(kwargs: dict, words: str) -> None:
    with pytest.raises(ByotError, match=words) as e:
        calibrate(population(500, seed=5), COSTS2, **kwargs)
    assert "\n" not in str(e.value)


def test_split_indices_is_a_partition() -> None:
    fit, test = split_indices(101, 0.3, seed=7)
    assert len(fit) == 30 and len(test) == 71
    assert sorted([*fit, *test]) == list(range(101))
    with pytest.raises(ByotError, match="too few"):
        split_indices(1, 0.5)


def test_msdnet_never_proposes_a_threshold_the_manifest_refuses() -> None:
    # Ties at a score of exactly 1.0 at the cut: "just above 1" is no score at all, so the
    # exit is off rather than 1.0000000000000002 (which every manifest load refuses).
    scores = np.ones((1, 100))
    scores[0, 60:] = np.linspace(0.2, 0.9, 40)
    for p in (0.5, 1.0, 1.5):
        (t,) = msdnet_thresholds(scores, p, 2)
        assert 0 <= t <= 1 or t == THRESHOLD_OFF


def test_cli_calibrate_prints_its_guarantee_and_refuses_point_with_delta(
        tmp_path: Path) -> None:
    from server_fixtures import write_val_logits
    from test_calibrate import small_manifest

    m = small_manifest(tmp_path)
    logits = write_val_logits(tmp_path / "val.npz", 4, 10, 4000, "synthetic")
    runner = CliRunner()
    r = runner.invoke(app, ["calibrate", str(m.root / "manifest.json"), "--logits",
                            str(logits), "--max-drop", "1", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "guarantee (ltt)" in r.output and "probability >= 0.9" in r.output
    r = runner.invoke(app, ["calibrate", str(m.root / "manifest.json"), "--logits",
                            str(logits), "--max-drop", "1", "--dry-run", "--point"])
    assert r.exit_code == 0, r.output
    assert "point estimate" in r.output
    r = runner.invoke(app, ["calibrate", str(m.root / "manifest.json"), "--logits",
                            str(logits), "--point", "--delta", "0.1"])
    assert r.exit_code == 2 and "--point" in r.output


@pytest.mark.parametrize("criterion", ["max_softmax", "margin", "entropy"])
@pytest.mark.parametrize("point", [True, False])
def test_calibrating_confident_wrong_exits_writes_a_manifest_that_loads(
        tmp_path: Path, criterion: str, point: bool) -> None:
    # The reproduction behind msdnet's cut: early exits with a margin of 50 (a score of
    # exactly 1.0) on 60% of the samples, all of them wrong; calibrate saves, and every
    # later load must take what it saved.
    from test_calibrate import small_manifest

    from byot_edge.manifest import load_manifest

    m = small_manifest(tmp_path)
    rng = np.random.default_rng(0)
    n, classes = 2000, 10
    labels = rng.integers(0, classes, n)
    logits = rng.standard_normal((4, n, classes)).astype(np.float32)
    logits[3, np.arange(n), labels] += 8.0  # the deepest exit is right
    confident = np.arange(n) < int(0.6 * n)
    wrong = (labels + 1) % classes
    logits[:3, confident, wrong[confident]] += 50.0
    path = tmp_path / "val.npz"
    np.savez(path, logits=logits, labels=labels, split="val", dataset="synthetic",
             exits=np.arange(1, 5))
    r = CliRunner().invoke(app, ["calibrate", str(m.root / "manifest.json"), "--logits",
                                 str(path), "--max-drop", "0.5", "--criterion", criterion,
                                 *(["--point"] if point else [])])
    assert r.exit_code == 0, r.output
    values = load_manifest(m.root).thresholds.values  # type: ignore[union-attr]
    assert all(0 <= t <= 1 or t == THRESHOLD_OFF for t in values), values
