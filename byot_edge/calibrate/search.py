"""The searches for thresholds, on a grid of observed scores.

Candidates come from three searches (`calibrate.choose` runs them), and the best one that
meets the objective wins:
- MSDNet's budgeted search (Huang et al., ICLR 2018, `dynamic_evaluate`): a one-parameter
  family where a fraction proportional to p^k of the samples leaves at exit k, each
  threshold set so that this fraction of the samples still running leaves there;
- a greedy path from "everyone to the deepest exit" down to "everyone at exit 1", each step
  lowering the one threshold that loses the least accuracy per unit of cost saved;
- a direct (coordinate) search from the best feasible candidate: each threshold in turn is
  moved to whichever grid value improves the objective while keeping it feasible, until
  nothing moves. With `--max-drop` this finds the least expected cost meeting the accuracy
  target; with a FLOPs or latency budget, the best accuracy within it.

Grid thresholds sit halfway between consecutive observed scores, so a backend whose logits
differ in the last float bits (ONNX Runtime vs PyTorch vs fp16 TensorRT) still makes the
same decisions as the replay.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from byot_edge.calibrate.candidates import Candidate, Evaluator
from byot_edge.runtime.policies import NEVER

MSDNET_P = np.arange(1, 40) / 20  # the reference code's p = 0.05 .. 1.95


def threshold_grid(scores: np.ndarray, size: int = 100) -> np.ndarray:
    """Thresholds halfway between consecutive distinct scores (at most `size` of them, spread
    over the quantiles), plus 0 (everyone leaves) and NEVER (no one does)."""
    u = np.unique(scores)
    mids = (u[1:] + u[:-1]) / 2
    if len(mids) > size:
        mids = mids[np.unique(np.linspace(0, len(mids) - 1, size).round().astype(int))]
    return np.unique(np.concatenate([[0.0], mids, [NEVER]]))


def msdnet_thresholds(scores: np.ndarray, p: float, num_exits: int) -> list[float]:
    """MSDNet's rule: a share q_k ~ p^k of all samples leaves at exit k, taking the most
    confident of those still running; the threshold falls between the last leaving and the
    first staying sample."""
    n = scores.shape[1]
    q = p ** np.arange(1, num_exits + 1, dtype=np.float64)
    q /= q.sum()
    running = np.ones(n, dtype=bool)
    out = []
    for k in range(num_exits - 1):
        leave = int(np.floor(n * q[k]))
        s = np.sort(scores[k, running])[::-1]
        if leave <= 0 or len(s) == 0:
            t = NEVER
        elif leave >= len(s):
            t = 0.0
        elif s[leave - 1] > s[leave]:
            t = float((s[leave - 1] + s[leave]) / 2)
        else:  # a tie at the cut: the tied samples stay (just above their score)...
            t = float(np.nextafter(s[leave - 1], np.inf))
            if t > 1:  # ...which no score can reach past 1 (a tie at 1.0): the exit is off
                t = NEVER
        out.append(t)
        running &= scores[k] < t
    return out


def greedy_path(ev: Evaluator, grids: list[np.ndarray], metric: str,
                quality: Callable[[Candidate], float] = lambda c: c.accuracy) -> None:
    """From all thresholds at NEVER down to all at 0, one grid step at a time, each step
    the one that loses the least `quality` (accuracy by default) per unit of cost saved."""
    idx = [len(g) - 1 for g in grids]
    cur = ev([g[i] for g, i in zip(grids, idx, strict=True)], "greedy")
    while any(i > 0 for i in idx):
        best: tuple[float, int, Candidate] | None = None
        for j, g in enumerate(grids):
            if idx[j] == 0:
                continue
            t = [gg[i] for gg, i in zip(grids, idx, strict=True)]
            t[j] = g[idx[j] - 1]
            c = ev(t, "greedy")
            saved = cur.cost(metric) - c.cost(metric)
            gain = quality(c) - quality(cur)
            # Free moves (no cost change, no loss) first; then least loss per cost saved.
            score = np.inf if saved <= 0 and gain >= 0 else gain / saved if saved > 0 else -np.inf
            if best is None or score > best[0]:
                best = (score, j, c)
        assert best is not None
        idx[best[1]] -= 1
        cur = best[2]


def direct_search(ev: Evaluator, grids: list[np.ndarray], start: Candidate,
                   feasible: Callable[[Candidate], bool],
                   key: Callable[[Candidate], tuple[float, float]], radius: int = 8,
                   passes: int = 50) -> Candidate:
    """Pattern search on the grid: move one threshold anywhere on its grid, or two at once
    within `radius` grid steps (one threshold alone often cannot move without breaking the
    constraint, while trading between two exits still pays), to the best feasible point."""
    pos = [int(np.searchsorted(g, t)) for g, t in zip(grids, start.thresholds, strict=True)]
    cur = start

    def at(p: list[int]) -> Candidate:
        return ev([float(g[i]) for g, i in zip(grids, p, strict=True)], "direct")

    def better(p: list[int]) -> bool:
        nonlocal cur, pos
        c = at(p)
        if feasible(c) and key(c) < key(cur):
            cur, pos = c, p
            return True
        return False

    for _ in range(passes):
        moved = False
        for j, g in enumerate(grids):  # one threshold, anywhere
            for i in range(len(g)):
                moved |= better([*pos[:j], i, *pos[j + 1:]])
        if moved:
            continue
        for a, b in itertools.combinations(range(len(grids)), 2):  # two, nearby
            base = list(pos)
            for da in range(-radius, radius + 1):
                for db in range(-radius, radius + 1):
                    p = list(base)
                    p[a] = min(max(base[a] + da, 0), len(grids[a]) - 1)
                    p[b] = min(max(base[b] + db, 0), len(grids[b]) - 1)
                    moved |= better(p)
        if not moved:
            break
    return cur
