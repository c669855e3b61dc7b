"""The risk-controlled search: Learn-then-Test over the threshold searches' frontier.

`calibrate.risk` holds the statistics; this module runs them over candidates. The searches
(MSDNet's family and the greedy path) run on the `fit` part of the calibration samples; their
frontier there (no candidate cheaper and with a smaller risk bound), from the most expensive
to the cheapest, is the order; fixed-sequence testing on the `test` part picks the cheapest
candidate whose bound stays within the target. Every exit switched off (the deepest exit
alone) has no risk at all, so it is the answer when not even the first candidate passes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from byot_edge.calibrate.candidates import Candidate, Evaluator
from byot_edge.calibrate.risk import Guarantee, fixed_sequence, risk_bound
from byot_edge.calibrate.search import MSDNET_P, greedy_path, msdnet_thresholds, threshold_grid
from byot_edge.runtime.policies import NEVER


def risk_frontier(ev: Evaluator, risk: str, metric: str,
                  allowed: Callable[[Candidate], bool], delta: float) -> list[Candidate]:
    """The candidates `ev` has seen that no other beats on both cost and risk bound (at
    `delta`, on `ev`'s samples), among those `allowed`, from the most expensive to the
    cheapest. The bound, not the empirical risk, orders them: a candidate that changes
    a few answers has a small bound and goes first, where one that loses and gains many
    (an empirical risk near 0, but a wide bound) would fail the first test and stop the
    sequence before any cheap candidate is tried."""
    bounded = [(c, risk_bound(c.risk, risk, delta)) for c in ev.seen.values()
               if allowed(c) and c.risk is not None]
    bounded.sort(key=lambda cb: (cb[0].cost(metric), cb[1]))
    out, best = [], np.inf
    for c, b in bounded:
        if b < best:
            out.append(c)
            best = b
    return out[::-1]


def search_fit(ev: Evaluator, risk: str, metric: str, grid_size: int) -> None:
    """MSDNet's family and the greedy path on `ev`'s samples (what `risk_frontier` reads)."""
    num_exits = ev.num_exits
    grids = [threshold_grid(ev.scores[k], grid_size) for k in range(num_exits - 1)]
    for p in MSDNET_P:
        ev(msdnet_thresholds(ev.scores, float(p), num_exits), f"msdnet p={p:.2f}")
    quality = ((lambda c: c.accuracy) if risk == "drop" else (lambda c: c.agreement))
    greedy_path(ev, grids, metric, quality)


def learn_then_test(ev: Evaluator, fit: np.ndarray, test: np.ndarray, *, risk: str,
                    max_risk: float, delta: float, metric: str,
                    allowed: Callable[[Candidate], bool],
                    grid_size: int = 100) -> tuple[Candidate, Guarantee, list[Candidate]]:
    """The cheapest candidate whose risk on new data is at most `max_risk` with probability
    1 - delta: (it, scored on every sample of `ev`; the guarantee; the order tested, scored
    on every sample)."""
    ev_fit, ev_test = ev.subset(fit), ev.subset(test)
    search_fit(ev_fit, risk, metric, grid_size)
    off = tuple([NEVER] * (ev.num_exits - 1))
    order = [c for c in risk_frontier(ev_fit, risk, metric, allowed, delta) if c.thresholds != off]
    counts = [ev_test(c.thresholds, "ltt").risk for c in order]
    i, bound, tested = fixed_sequence(counts, risk, max_risk, delta)  # type: ignore[arg-type]
    thresholds = order[i].thresholds if i >= 0 else off
    guarantee = Guarantee(risk, max_risk, delta, bound if i >= 0 else 0.0, len(fit), len(test),
                          tested)
    ordered = [ev(c.thresholds, "ltt order") for c in order]
    chosen = ev(thresholds, "ltt")
    return chosen, guarantee, ordered
