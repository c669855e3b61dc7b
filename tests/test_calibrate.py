"""Threshold calibration on recorded logits: no backend, no export."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from byot_edge.calibrate import (
    Costs,
    ValLogits,
    calibrate,
    calibrate_manifest,
    fit_temperature,
    load_logits,
    manifest_costs,
    msdnet_thresholds,
    plot_calibration,
    save_val_logits,
    threshold_grid,
    write_thresholds,
)
from byot_edge.errors import ByotError
from byot_edge.manifest import (
    ExitEntry,
    InputSpec,
    LatencyProfile,
    Manifest,
    load_manifest,
)
from byot_edge.plans import Plan
from byot_edge.runtime.policies import (
    NEVER,
    ConfidenceThresholds,
    confidence,
    exits_for_thresholds,
    simulate,
)


def val_logits(k: int = 3, n: int = 2000, c: int = 10, seed: int = 0,
               split: str = "val") -> ValLogits:
    """Deeper exits are more accurate and confidence tracks correctness, as after training."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    easy = rng.uniform(0, 1, n)
    logits = []
    for j in range(k):
        z = rng.standard_normal((n, c))
        z[np.arange(n), y] += (j + 1) * 1.6 * (1.1 - easy)
        logits.append(z)
    return ValLogits(np.stack(logits).astype(np.float32), y, split, "synthetic", Path("val.npz"))


COSTS = Costs([1.0, 2.1, 3.3], [1.0, 2.0, 3.0])


def brute_force(val: ValLogits, costs: Costs, grid_size: int, feasible, key):  # type: ignore[no-untyped-def]
    scores = np.stack([confidence(val.logits[j]) for j in range(val.num_exits - 1)])
    correct = val.logits.argmax(2) == val.labels
    grids = [threshold_grid(s, grid_size) for s in scores]
    best = None
    for t in itertools.product(*grids):
        e = exits_for_thresholds(scores, t)
        acc = correct[e, np.arange(len(e))].mean()
        cost = (costs.flops_alone[-1] if all(v > 1 for v in t)
                else np.asarray(costs.flops_cascade)[e].mean())
        if feasible(acc, cost) and (best is None or key(acc, cost) < key(*best)):
            best = (acc, cost)
    return best


@pytest.mark.parametrize("seed", [0, 1])  # greedy alone misses the optimum on seed 1
def test_max_drop_meets_the_target_at_least_cost_on_the_grid(seed: int) -> None:
    val = val_logits(seed=seed)
    cal = calibrate(val, COSTS, max_drop=1.0, grid_size=30)
    c = cal.chosen
    assert c.accuracy >= cal.deepest_accuracy - 0.01
    assert c.flops < COSTS.flops_alone[-1]  # cheaper than the deepest exit alone
    best = brute_force(val, COSTS, 30, lambda a, f: a >= cal.deepest_accuracy - 0.01 - 1e-12,
                       lambda a, f: (f, -a))
    assert best is not None
    assert c.flops <= best[1] + 1e-9  # as cheap as exhaustive search over the same grid


def test_flops_budget_gives_the_best_accuracy_within_it() -> None:
    val = val_logits(seed=1)
    cal = calibrate(val, COSTS, flops_budget=1.8, grid_size=30)
    assert cal.chosen.flops <= 1.8
    assert cal.metric == "flops" and "<= 1.8" in cal.objective
    best = brute_force(val, COSTS, 30, lambda a, f: f <= 1.8, lambda a, f: (-a, f))
    assert best is not None
    assert cal.chosen.accuracy >= best[0] - 1e-12


def test_replaying_the_chosen_thresholds_reproduces_their_figures() -> None:
    val = val_logits(seed=2)
    for criterion in ("max_softmax", "entropy", "margin"):
        cal = calibrate(val, COSTS, max_drop=0.5, criterion=criterion, temperature=True)
        c = cal.chosen
        assert cal.temperatures is not None
        policy = ConfidenceThresholds(c.thresholds, criterion, tuple(cal.temperatures))
        sim = simulate(val.logits, policy)
        assert (sim.predictions == val.labels).mean() == pytest.approx(c.accuracy)
        fractions = np.bincount(sim.exits, minlength=4)[1:] / len(val.labels)
        assert fractions == pytest.approx(c.fractions)
        assert len(set(sim.exits.tolist())) >= 2


def test_infeasible_budget_and_conflicting_objectives_are_refused() -> None:
    val = val_logits()
    with pytest.raises(ByotError, match="Raise the budget"):
        calibrate(val, COSTS, flops_budget=0.5)
    with pytest.raises(ByotError, match="choose one of"):
        calibrate(val, COSTS, max_drop=1.0, flops_budget=2.0)
    with pytest.raises(ByotError, match="needs a latency profile"):
        calibrate(val, COSTS, latency_budget_ms=1.0)
    with pytest.raises(ByotError, match="3 exits but the model has 4"):
        calibrate(val, Costs([1, 2, 3, 4], [1, 2, 3, 4]), max_drop=1.0)


def test_a_zero_drop_can_always_be_met() -> None:
    cal = calibrate(val_logits(), COSTS, max_drop=0.0)
    assert cal.chosen.accuracy >= cal.deepest_accuracy


def test_msdnet_shares_follow_p_to_the_k() -> None:
    val = val_logits(n=1200)
    scores = np.stack([confidence(z) for z in val.logits[:-1]])
    for p, expect in [(1.0, [1 / 3, 1 / 3]), (0.5, [4 / 7, 2 / 7])]:
        t = msdnet_thresholds(scores, p, 3)
        e = exits_for_thresholds(scores, t)
        shares = np.bincount(e, minlength=3)[:2] / len(e)
        assert shares == pytest.approx(expect, abs=2 / len(e))
        assert all(0 <= v <= 1 for v in t)


def test_grid_thresholds_sit_between_observed_scores() -> None:
    scores = np.array([0.2, 0.4, 0.4, 0.9])
    assert threshold_grid(scores).tolist() == [0.0, 0.30000000000000004, 0.65, NEVER]
    assert len(threshold_grid(np.random.default_rng(0).random(5000), 50)) <= 52


def test_fit_temperature_recovers_the_generating_one() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20000, 5)) * 3
    for t_true in (0.5, 2.0):
        p = np.exp(z / t_true)
        p /= p.sum(1, keepdims=True)
        y = (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)
        assert fit_temperature(z, y) == pytest.approx(t_true, rel=0.1)


def test_load_logits_checks_the_file(tmp_path: Path) -> None:
    v = val_logits(n=50)
    good = tmp_path / "val.npz"
    np.savez(good, logits=v.logits, labels=v.labels, split="val", dataset="cifar10",
             exits=np.arange(1, 4))
    loaded = load_logits(good)
    assert (loaded.split, loaded.dataset) == ("val", "cifar10")
    assert loaded.logits.shape == (3, 50, 10)
    cases = {
        "missing": (None, "does not exist"),
        "nolabels": ({"logits": v.logits}, "lacks labels"),
        "shape": ({"logits": v.logits[0], "labels": v.labels}, r"expected \[exits, N, classes\]"),
        "labels": ({"logits": v.logits, "labels": v.labels + 10}, "outside 0..9"),
        "nan": ({"logits": v.logits * np.nan, "labels": v.labels}, "NaN"),
    }
    for name, (arrays, pattern) in cases.items():
        path = tmp_path / f"{name}.npz"
        if arrays is not None:
            np.savez(path, **arrays)
        with pytest.raises(ByotError, match=pattern):
            load_logits(path)


def test_logits_from_eval_calibrate_as_pytorch_fp32(tmp_path: Path) -> None:
    """`byot-edge eval --save-logits` files say nothing of a backend: PyTorch in fp32, and
    the thresholds say so; files that name one (engine logits) are taken at their word."""
    v = val_logits(k=4, n=200)
    small_manifest(tmp_path)
    eval_file = tmp_path / "val.npz"
    np.savez(eval_file, logits=v.logits, labels=v.labels, split="val", dataset="synthetic",
             exits=np.arange(1, 5))
    calibrate_manifest(tmp_path / "manifest.json", eval_file, max_drop=1.0)
    th = load_manifest(tmp_path).thresholds
    assert (th.backend, th.precision) == ("torch", "fp32")
    engine_file = tmp_path / "engine.npz"
    save_val_logits(engine_file, dataclasses.replace(load_logits(eval_file),
                                                     backend="onnxruntime", precision="int8"))
    calibrate_manifest(tmp_path / "manifest.json", engine_file, max_drop=1.0)
    th = load_manifest(tmp_path).thresholds
    assert (th.backend, th.precision) == ("onnxruntime", "int8")


def test_test_split_is_warned_about() -> None:
    cal = calibrate(val_logits(split="test"), COSTS, max_drop=1.0)
    assert "TEST split" in cal.notes[0]
    assert not calibrate(val_logits(), COSTS, max_drop=1.0).notes


def small_manifest(tmp_path: Path) -> Manifest:
    # Sections of 900k FLOPs, branches of 100k (the deepest: its pool + fc), as export counts.
    exits = [ExitEntry(k, f"layer{k}", 8 * k, 2 ** k, 1000 * k, 10 * k, section_flops=900,
                       branch_flops=100) for k in range(1, 5)]
    model = {"arch": "resnet18", "num_classes": 10, "in_chans": 3, "input_size": 32,
             "stem": "cifar", "width": 0.125, "extra": {}}
    m = Manifest(model, [f"c{i}" for i in range(10)], InputSpec([3, 32, 32]), exits,
                 dataset="synthetic", root=tmp_path)
    m.save()
    return load_manifest(tmp_path)


def test_a_manifest_without_segment_flops_says_to_re_export(tmp_path: Path) -> None:
    m = small_manifest(tmp_path)
    m.exits[2].section_flops = None  # as written by exports before they were counted
    with pytest.raises(ByotError, match=r"predates per-segment FLOPs.*re-export"):
        manifest_costs(m)


def ms(p50: float) -> dict[str, float]:
    """Timings of one file as a profile stores them: here only the p50 matters."""
    return {"p50": p50, "p90": 2 * p50, "p99": 3 * p50, "mean": p50, "runs": 5}


def profile(batch: int, entries: list[dict]) -> LatencyProfile:
    return LatencyProfile.from_dict({"backend": "onnxruntime", "device": "cpu (x)",
                                     "batch": batch, "exits": entries, "created": "t1"})


def test_costs_from_flops_and_from_a_latency_profile(tmp_path: Path) -> None:
    m = small_manifest(tmp_path)
    costs = manifest_costs(m)
    # As export counted them: the cascade to exit k runs every branch before it.
    assert costs.latency_cascade is None
    assert costs.flops_cascade == [1000, 2000, 3000, 4000]
    entries = [{"exit": k, "truncated": ms(2.0 * k), "segment": ms(1.0 * k),
                "spans": {str(i): ms(0.9 * (k - i + 1)) for i in range(1, k)}}
               for k in range(1, 5)]
    m.latency_profiles = [profile(2, entries), profile(8, entries)]
    costs = manifest_costs(m)
    assert costs.latency_cascade == pytest.approx([0.5, 1.5, 3.0, 5.0])  # per sample, batch 2
    assert costs.latency_alone == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert "batch 2" in costs.latency_source
    assert costs.span_latency[(1, 4)] == pytest.approx(1.8)  # 0.9 * 4 segments / batch 2
    assert len(costs.span_latency) == 6
    # FLOPs: each shallow exit's branch, what switching the exit off saves.
    assert costs.branch_flops == [100, 100, 100]
    assert manifest_costs(m, backend="tensorrt").latency_cascade is None
    # A server batching requests prices the cascade at its own batch size.
    at8 = manifest_costs(m, batch=8)
    assert at8.latency_cascade == pytest.approx([0.125, 0.375, 0.75, 1.25])
    assert "batch 8" in at8.latency_source
    with pytest.raises(ByotError, match=r"no latency profile at batch 4.*batch 2, 8"):
        manifest_costs(m, batch=4)
    assert any("predates runtime timing" in n for n in costs.notes)
    # The runtime's time per step (its cascade less the segments, per step) is priced into
    # every step and every single-exit call.
    timed = [dict(e) for e in entries]
    timed[-1]["cascade"] = ms(10.0 + 4 * 0.5)  # segments take 1+2+3+4 = 10
    m.latency_profiles = [profile(2, timed)]
    costs = manifest_costs(m)
    # 0.5 ms per step at batch 2: 0.25 ms per sample on top of each segment's 0.5 k
    assert costs.latency_cascade == pytest.approx([0.75, 2.0, 3.75, 6.0])
    assert costs.latency_alone == pytest.approx([1.25, 2.25, 3.25, 4.25])
    assert costs.span_latency[(1, 4)] == pytest.approx(2.05)
    assert "0.5 ms of runtime per step" in costs.latency_source
    assert not any("predates runtime timing" in n for n in costs.notes)
    assert any("predates plan timing" in n for n in costs.notes)
    # Plans timed through the runtime are priced as measured, not composed; so is the
    # deepest exit alone (its plan's one step), and exits alone pay its extra over the file.
    timed[-1]["plans"] = {key: [ms(v) for v in at] for key, at in {
        "1,2,3,4": [1.5, 3.5, 7.0, 11.0], "1,4": [1.5, 10.0], "4": [8.4]}.items()}
    m.latency_profiles = [profile(2, timed)]
    costs = manifest_costs(m)
    assert costs.plan_costs((1, 4), "latency") == pytest.approx([0.75, 5.0, 5.0, 5.0])
    assert costs.latency_cascade == pytest.approx([0.75, 1.75, 3.5, 5.5])
    assert costs.latency_alone == pytest.approx([1.2, 2.2, 3.2, 4.2])  # 8.4 ms vs 8.0: +0.2
    assert "3 plans timed through the runtime" in costs.latency_source
    assert not any("predates" in n for n in costs.notes)
    # A plan the profile did not time is composed as before.
    assert costs.plan_costs((2, 4), "latency") == pytest.approx([1.15, 1.15, 2.3, 2.3])
    # The deepest exit alone stays as measured when its plan came out faster than its file
    # (noise): the worst-case bound divides by it. Exits alone then pay no extra.
    timed[-1]["plans"]["4"] = [ms(7.6)]
    m.latency_profiles = [profile(2, timed)]
    costs = manifest_costs(m)
    assert costs.latency_alone == pytest.approx([1.0, 2.0, 3.0, 3.8])


def test_exits_that_are_off_cost_no_branch_and_spans_their_profiled_time() -> None:
    # Segment times 1.0, 1.5, 2.0 ms; branches of exits 1 and 2: 2 and 3 FLOPs.
    costs = Costs([10.0, 25.0, 45.0], [8.0, 20.0, 40.0], [1.0, 2.5, 4.5], [0.8, 2.0, 4.0],
                  branch_flops=[2.0, 3.0], span_latency={(2, 3): 1.6, (1, 2): 2.0, (1, 3): 3.9})
    assert costs.plan_costs((1, 2, 3), "flops") == [10.0, 25.0, 45.0]
    assert costs.plan_costs((1, 3), "flops") == [10.0, 42.0, 42.0]  # exit 2's branch skipped
    assert costs.plan_costs((2, 3), "flops") == [23.0, 23.0, 43.0]  # exit 1's branch skipped
    assert costs.plan_costs((1, 2, 3), "latency") == [1.0, 2.5, 4.5]
    assert costs.plan_costs((1, 3), "latency") == pytest.approx([1.0, 2.6, 2.6])
    assert costs.plan_costs((2, 3), "latency") == pytest.approx([2.0, 2.0, 4.0])
    assert costs.plan_costs((3,), "latency") == pytest.approx([3.9, 3.9, 3.9])
    # Without a profiled span (an engine backend chains segments): the segments' sum.
    plain = Costs([10.0, 25.0, 45.0], [8.0, 20.0, 40.0], [1.0, 2.5, 4.5], [0.8, 2.0, 4.0])
    assert plain.plan_costs((1, 3), "latency") == pytest.approx([1.0, 4.5, 4.5])
    # The search prices every candidate the way the runtime runs it.
    val = val_logits()
    cal = calibrate(val, costs, max_drop=1.0, grid_size=30)
    scores = np.stack([confidence(val.logits[j]) for j in range(2)])
    for c in cal.candidates:
        if all(t > 1 for t in c.thresholds):
            continue  # the runtime runs the truncated network alone
        plan = (*(k for k, t in enumerate(c.thresholds, start=1) if t <= 1), 3)
        e = exits_for_thresholds(scores, c.thresholds)
        # The slowest sample stops at the first exit that answers everyone (threshold 0).
        last = next((k for k, t in enumerate(c.thresholds, start=1) if t <= 0), 3)
        for metric in ("latency", "flops"):
            at = np.asarray(costs.plan_costs(plan, metric))
            assert c.cost(metric) == pytest.approx(at[e].mean())
            assert c.worst(metric) == pytest.approx(at[last - 1])
            assert c.worst(metric) >= at[e].max() - 1e-12
    assert any(t > 1 for c in cal.candidates for t in c.thresholds[:1])
    assert any(0 < t <= 1 for c in cal.candidates for t in c.thresholds[1:])
    assert any(t <= 0 for c in cal.candidates for t in c.thresholds[1:])


def test_a_worst_case_bound_limits_which_branches_run() -> None:
    # Branches cost 7% and 6% of the deepest exit alone (7.0): each one on adds that to a
    # sample that no exit lets go.
    costs = Costs([2.5, 4.9, 7.9], [2.5, 4.4, 7.0], branch_flops=[0.5, 0.4])
    val = val_logits()
    free = calibrate(val, costs, max_drop=2.0, grid_size=30)
    ratio = free.chosen.worst_flops / 7.0
    assert ratio > 1.05  # unbounded, the cheapest cascade on average keeps a branch on
    bound = (1 + ratio) / 2
    limited = calibrate(val, costs, max_drop=2.0, max_worst_case=bound, grid_size=30)
    c = limited.chosen
    assert c.worst_flops <= bound * 7.0 and c.accuracy >= limited.deepest_accuracy - 0.02
    assert c.flops >= free.chosen.flops  # the bound costs something on average
    assert f"worst case <= {bound:g}x" in limited.objective
    # 1.0: no branch may run; the only way is the deepest exit alone.
    none = calibrate(val, costs, max_drop=2.0, max_worst_case=1.0, grid_size=30)
    assert all(t > 1 for t in none.chosen.thresholds)
    with pytest.raises(ByotError, match="at least 1"):
        calibrate(val, costs, max_drop=2.0, max_worst_case=0.9)


def test_write_thresholds_keeps_everything_else(tmp_path: Path) -> None:
    m = small_manifest(tmp_path)
    before = m.to_dict()
    val = val_logits(k=4)
    cal = calibrate(val, Costs([1, 2, 3, 4], [1, 2, 3, 4]), max_drop=1.0, temperature=True)
    write_thresholds(m, cal, "val.npz")
    again = load_manifest(tmp_path)
    assert again.thresholds is not None
    assert again.thresholds.values == pytest.approx(list(cal.chosen.thresholds))
    assert again.thresholds.temperatures == pytest.approx(cal.temperatures)
    assert again.thresholds.expected["accuracy"] == pytest.approx(cal.chosen.accuracy)
    after = again.to_dict()
    after.pop("thresholds")
    before.pop("thresholds")
    assert after == before


def test_plot_writes_a_png(tmp_path: Path) -> None:
    cal = calibrate(val_logits(), Costs([1e6, 2e6, 3e6], [1e6, 2e6, 3e6], [1, 2, 3], [1, 2, 3]),
                    max_drop=1.0)
    assert cal.metric == "latency"
    out = plot_calibration(cal, tmp_path / "curve.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_malformed_profile_says_to_profile_again(tmp_path: Path) -> None:
    m = small_manifest(tmp_path)
    entries = [{"exit": k, "segment": ms(1.0)} for k in range(1, 5)]
    entries[-1]["plans"] = {"1,4": [ms(1.0), ms(2.0)]}
    good = profile(1, entries)
    assert good.plans[Plan((1, 4))][1].p50 == 2.0
    assert good.to_dict()["exits"] == entries  # the JSON form, as read
    m.latency_profiles = [good]
    m.save()
    assert load_manifest(m.root).latency_profiles == [good]
    for broken in ({"p50": 1.0}, "fast"):  # a statistic missing; not timings at all
        bad = [dict(e) for e in entries]
        bad[1]["segment"] = broken
        with pytest.raises(ByotError, match="re-run `byot-edge profile`"):
            profile(1, bad)
    raw = json.loads((m.root / "manifest.json").read_text())
    raw["latency_profiles"][0]["exits"].pop(2)  # exit 3 has no entry
    (m.root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ByotError, match=r"exits \[1, 2, 4\].*byot-edge profile"):
        load_manifest(m.root)
