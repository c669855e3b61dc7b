"""Exit policies on recorded logits, with no backend."""

from __future__ import annotations

import numpy as np
import pytest

from byot_edge.errors import ByotError
from byot_edge.plans import Plan, all_plans
from byot_edge.runtime.policies import (
    CRITERIA,
    NEVER,
    PYTHON_MAX_LOGITS,
    ConfidenceThresholds,
    Deadline,
    Softmax,
    Step,
    confidence,
    deepest_exit_within,
    exits_for_thresholds,
    exits_to_compute,
    simulate,
    softmax,
)


def recorded_logits(k: int = 4, n: int = 300, c: int = 10, seed: int = 0) -> np.ndarray:
    """Logits whose sharpness varies per sample and grows with depth, like a trained model's."""
    rng = np.random.default_rng(seed)
    sharp = rng.uniform(0, 4, n)
    return np.stack([rng.standard_normal((n, c)) * sharp[:, None] * (1 + j / 2)
                     for j in range(k)]).astype(np.float32)


def test_confidence_criteria_on_known_logits() -> None:
    uniform = np.zeros((1, 4))
    sure = np.array([[50.0, 0.0, 0.0, 0.0]])
    two_way = np.array([[0.0, 0.0, -np.inf, -np.inf]])
    assert confidence(uniform, "max_softmax") == pytest.approx([0.25])
    assert confidence(uniform, "entropy") == pytest.approx([0.0])
    assert confidence(uniform, "margin") == pytest.approx([0.0])
    for criterion in ("max_softmax", "entropy", "margin"):
        assert confidence(sure, criterion) == pytest.approx([1.0], abs=1e-9)
    # Two equally likely classes out of four: entropy log 2 of log 4 -> score 0.5.
    assert confidence(two_way, "entropy") == pytest.approx([0.5])
    assert confidence(two_way, "max_softmax") == pytest.approx([0.5])


def test_temperature_softens_confidence() -> None:
    z = recorded_logits()[0]
    assert (confidence(z, temperature=2.0) <= confidence(z) + 1e-12).all()
    assert (confidence(z, temperature=2.0) < confidence(z)).any()


def test_unknown_criterion_names_the_choices() -> None:
    with pytest.raises(ByotError, match="max_softmax, entropy, margin"):
        confidence(np.zeros((1, 3)), "variance")


def test_thresholds_answer_confident_samples_and_the_deepest_answers_all() -> None:
    logits = np.array([[5.0, 0.0], [0.1, 0.0], [0.0, 3.0]])
    policy = ConfidenceThresholds.for_model(0.9, num_exits=3)
    assert policy(Step(1, 3, logits)) == [True, False, True]
    assert policy(Step(3, 3, logits)) == [True] * 3
    per_exit = ConfidenceThresholds.for_model([0.99, 0.5], num_exits=3)
    assert per_exit(Step(1, 3, logits)) == [True, False, False]
    assert per_exit(Step(2, 3, logits)) == [True] * 3
    off = ConfidenceThresholds.for_model(NEVER, num_exits=3)
    assert off(Step(1, 3, logits)) == [False] * 3


def test_threshold_count_is_checked() -> None:
    with pytest.raises(ByotError, match="one threshold or 3"):
        ConfidenceThresholds.for_model([0.5, 0.5], num_exits=4)
    with pytest.raises(ByotError, match="4 temperatures"):
        ConfidenceThresholds.for_model(0.5, num_exits=4, temperatures=[1.0])


def test_a_zero_threshold_answers_everyone_there() -> None:
    logits = recorded_logits()
    sim = simulate(logits, ConfidenceThresholds((NEVER, 0.0, NEVER)))
    assert (sim.exits == 2).all()
    assert (sim.predictions == logits[1].argmax(1)).all()
    assert sim.steps == [(2, logits.shape[1])]  # exit 1 is off: one step, sections 1..2


def never_early(step: Step) -> np.ndarray:
    """A policy that answers no one before the deepest exit, and computes every exit."""
    return np.zeros(len(step.logits), dtype=bool)


def test_deadline_answers_from_the_deepest_exit_reached() -> None:
    logits = recorded_logits(k=4)
    # 1 ms per segment: after exit 2 (2 ms) the next segment would end at 3 ms > 2.5 ms.
    sim = simulate(logits, Deadline(2.5, never_early), segment_ms=[1.0, 1.0, 1.0, 1.0])
    assert (sim.exits == 2).all()
    assert (sim.predictions == logits[1].argmax(1)).all()
    assert [n for _, n in sim.steps] == [logits.shape[1]] * 2
    # A generous budget leaves the inner policy alone; an unknown next cost never stops it.
    assert (simulate(logits, Deadline(100.0, never_early), [1.0] * 4).exits == 4).all()
    assert (simulate(logits, Deadline(0.1, never_early)).exits == 4).all()


def test_a_deadline_over_thresholds_computes_only_the_exits_that_are_on() -> None:
    th = ConfidenceThresholds((NEVER, 0.6, NEVER))
    assert exits_to_compute(Deadline(5.0, th), 4).exits == (2, 4)
    assert exits_to_compute(th, 4).exits == (2, 4)
    assert exits_to_compute(never_early, 4).exits == (1, 2, 3, 4)
    # All shallow exits off: nothing to stop at before the deepest.
    assert exits_to_compute(Deadline(5.0, ConfidenceThresholds((NEVER,) * 3)), 4).exits == (4,)
    # The next cost is the plan's next step: segments 3 and 4 (2 ms), not segment 3 alone.
    logits = recorded_logits(k=4)
    sim = simulate(logits, Deadline(3.5, ConfidenceThresholds((NEVER, NEVER, NEVER))),
                   segment_ms=[1.0] * 4)
    assert sim.steps == [(4, logits.shape[1])]
    sim = simulate(logits, Deadline(3.5, th), segment_ms=[1.0] * 4)
    assert {k for k, _ in sim.steps} <= {2, 4}
    assert set(sim.exits.tolist()) == {2}  # 2 ms spent + 2 ms next > 3.5


def test_deadline_keeps_early_exits_of_the_inner_policy() -> None:
    logits = recorded_logits(k=3)
    inner = ConfidenceThresholds.for_model(0.6, 3)
    free = simulate(logits, inner)
    timed = simulate(logits, Deadline(2.5, inner), segment_ms=[1.0, 1.0, 1.0])
    early = free.exits == 1
    assert early.any() and (~early).any()
    assert (timed.exits[early] == 1).all()
    assert (timed.exits[~early] == 2).all()  # would have gone deeper, cut at exit 2


def test_deepest_exit_within() -> None:
    assert deepest_exit_within([1.0, 2.0, 3.0, 4.0], 2.5) == 2
    assert deepest_exit_within([1.0, 2.0, 3.0, 4.0], 10) == 4
    assert deepest_exit_within([1.0, 2.0], 0.5) is None
    # Non-monotone measurements: still the deepest that fits.
    assert deepest_exit_within([1.0, 3.0, 2.0], 2.5) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("criterion", ["max_softmax", "entropy", "margin"])
def test_simulation_matches_vectorised_rule(seed: int, criterion: str) -> None:
    logits = recorded_logits(seed=seed)
    rng = np.random.default_rng(seed)
    thresholds = rng.uniform(0.2, 0.9, 3)
    temps = rng.uniform(0.5, 2.0, 4)
    policy = ConfidenceThresholds.for_model(thresholds, 4, criterion, temps)
    sim = simulate(logits, policy)
    scores = np.stack([confidence(logits[k], criterion, temps[k]) for k in range(3)])
    exits = exits_for_thresholds(scores, thresholds) + 1
    assert (sim.exits == exits).all()
    assert len(np.unique(exits)) >= 3  # the case exercises early and late exits
    assert (sim.predictions == logits[exits - 1, np.arange(len(exits))].argmax(1)).all()
    # Each step runs only the samples that were not answered before.
    reached = [(exits >= k).sum() for k in range(1, 5)]
    assert [n for _, n in sim.steps] == [r for r in reached if r > 0]


def test_worst_case_keeps_only_the_exits_that_answer_everyone() -> None:
    th = ConfidenceThresholds((0.7, NEVER, 0.0, 0.4), "margin", (1.0, 2.0, 1.0, 1.0, 1.0))
    worst = th.worst_case()
    assert worst.values == (NEVER, NEVER, 0.0, NEVER)
    assert (worst.criterion, worst.temperatures) == (th.criterion, th.temperatures)
    assert th.active_exits(5).exits == (1, 3, 4, 5)
    # Replayed on any logits, every sample leaves at exit 3, the first that answers all.
    logits = np.random.default_rng(0).standard_normal((5, 50, 10)) * 5
    assert (simulate(logits, worst).exits == 3).all()


def test_a_plan_is_the_exits_that_are_on_ending_at_the_deepest() -> None:
    plan = Plan.parse("1,3,4")
    assert plan.exits == (1, 3, 4) and plan.key == "1,3,4" and list(plan) == [1, 3, 4]
    assert plan.steps() == [(1, 1), (2, 3), (4, 4)]
    assert Plan.from_thresholds([0.9, NEVER, 0.0], 4) == plan
    assert Plan.from_thresholds([NEVER] * 3, 4).full_network
    assert not plan.full_network
    assert [p.key for p in all_plans(3)] == ["3", "1,3", "2,3", "1,2,3"]
    for bad in ("3,1", "1,1,4", "0,4", "", "a,4"):
        with pytest.raises(ByotError, match="plan"):
            Plan.parse(bad)
    with pytest.raises(ByotError, match=r"deepest exit \(5\)"):
        plan.check(5)


def _reference_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax written the plain way: copy, divide, shift, exp, sum from the first class to
    the last, normalise."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature != 1.0:
        z = z / float(temperature)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / np.add.accumulate(e, axis=-1)[..., -1:]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_softmax_is_bit_identical_to_the_plain_formula(dtype: type) -> None:
    rng = np.random.default_rng(3)
    for n, c in [(1, 10), (7, 3), (33, 10), (64, 100), (5, 1000)]:
        logits = (rng.standard_normal((n, c)) * rng.uniform(0.5, 20)).astype(dtype)
        kept = logits.copy()
        for t in (1.0, 0.7, 2.5):
            p = softmax(logits, t)
            assert p.dtype == np.float64
            assert np.array_equal(p, _reference_softmax(logits, t))
            # Rows are independent: a subset scores as it does inside the whole batch (the
            # cascade answers subsets from the step's softmax).
            rows = rng.random(n) < 0.5
            assert np.array_equal(p[rows], softmax(logits[rows], t))
            assert np.array_equal(confidence(logits, "max_softmax", t),
                                  _reference_softmax(logits, t).max(axis=-1))
        assert np.array_equal(logits, kept)  # the input is not written to


def test_step_softmax_is_computed_once_and_shared() -> None:
    logits = recorded_logits(k=1, n=20)[0]
    step = Step(1, 3, logits)
    p = step.probabilities(2.0)
    assert step.probabilities(2.0) is p
    assert np.array_equal(p, _reference_softmax(logits, 2.0))
    assert np.array_equal(step.probabilities(), _reference_softmax(logits))
    policy = ConfidenceThresholds((0.3, 0.6), temperatures=(2.0, 1.0, 1.0))
    assert np.array_equal(policy(step), _reference_softmax(logits, 2.0).max(axis=-1) >= 0.3)
    assert step == Step(1, 3, logits)  # the cache is not part of the step's value


def test_the_max_softmax_score_is_the_largest_probability_bit_for_bit() -> None:
    # The cascade scores with 1 / sum(exp(z - max z)) and never divides the other classes:
    # it must be the maximum of the probabilities themselves, to the last bit.
    rng = np.random.default_rng(3)
    for scale in (0.1, 3.0, 40.0):
        logits = (rng.standard_normal((64, 10)) * scale).astype(np.float32)
        for t in (1.0, 0.7, 2.5):
            assert np.array_equal(Softmax(logits, t).scores, softmax(logits, t).max(axis=-1))
            assert np.array_equal(confidence(logits, "max_softmax", t),
                                  _reference_softmax(logits, t).max(axis=-1))


def test_python_floats_and_numpy_score_alike_to_the_last_bit() -> None:
    # Small inputs are scored in Python floats, large ones in numpy (PYTHON_MAX_LOGITS): a
    # row must get the same bits either way, or a sample answered alone would not be
    # answered as it is inside a batch, or as calibration replayed it.
    rng = np.random.default_rng(5)
    for c in (2, 10, 100):
        n = PYTHON_MAX_LOGITS // c * 4
        logits = (rng.standard_normal((n, c)) * rng.uniform(0.5, 30)).astype(np.float32)
        logits[0, :2] = logits[0].max() + 1  # a tie: the first largest is the class
        big = logits[: PYTHON_MAX_LOGITS // c + 1]  # one row past the Python floats' limit
        for t in (1.0, 0.7, 2.5):
            whole = Softmax(big, t)
            rows = max(1, PYTHON_MAX_LOGITS // c // 2)  # a few at a time: Python floats
            for i in range(0, len(big), rows):
                alone = Softmax(big[i:i + rows], t)
                assert alone.scores == whole.scores[i:i + rows]
                assert alone.classes == whole.classes[i:i + rows]
                assert np.array_equal(alone.probabilities(), whole.probabilities()[i:i + rows])
            for criterion in CRITERIA:
                assert np.array_equal(confidence(big[:2], criterion, t),
                                      confidence(big, criterion, t)[:2])
        assert Softmax(logits[:1]).classes == [0] == Softmax(logits).classes[:1]
    # Rows with NaN or inf score NaN in both, and name the class numpy's argmax names.
    odd = np.array([[1.0, np.nan, 3.0], [np.inf, 0.0, np.inf], [-np.inf, 2.0, 1.0]])
    odd_big = np.tile(odd, (PYTHON_MAX_LOGITS, 1))
    with np.errstate(invalid="ignore"):  # numpy's inf - inf
        big_softmax = Softmax(odd_big)
    assert Softmax(odd).classes == odd.argmax(-1).tolist() == big_softmax.classes[:3]
    small, large = Softmax(odd).scores, big_softmax.scores[:3]
    assert np.array_equal(small, large, equal_nan=True)
    assert np.isnan(small[:2]).all() and small[2] == pytest.approx(1 / (1 + np.exp(-1)))


def test_at_least_decides_as_the_scores_do_even_at_a_threshold_on_a_score(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from byot_edge.runtime import policies

    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((8, 10)) * 3).astype(np.float32)  # Python floats' size
    with_nan = logits.copy()
    with_nan[3, 1] = np.nan
    numpy_exps = []
    real_exp = policies._exp
    monkeypatch.setattr(policies, "_exp", lambda x: numpy_exps.append(1) or real_exp(x))
    for temperature in (1.0, 0.7):
        exact = Softmax(logits, temperature).scores
        edges = exact + [float(np.nextafter(s, 0)) for s in exact] + [
            float(np.nextafter(s, 2)) for s in exact]
        for threshold in (*edges, 0.0, 0.3, 0.95, NEVER):
            numpy_exps.clear()
            assert Softmax(logits, temperature).at_least(threshold) == [
                s >= threshold for s in exact]
            # numpy's exp only when a score is within 1e-9 of the threshold
            near = any(abs(s - threshold) <= 1e-9 * threshold for s in exact)
            assert bool(numpy_exps) == near, threshold
            # A NaN row never reaches a threshold, as its NaN score decides.
            nan_exact = Softmax(with_nan, temperature).scores
            assert Softmax(with_nan, temperature).at_least(threshold) == [
                s >= threshold for s in nan_exact]
