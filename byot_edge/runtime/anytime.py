"""The anytime model: manifest + backend + policy.

    model = AnytimeModel.load("deploy/manifest.json", backend="onnxruntime")
    model.predict(batch, threshold=0.9)   # confidence cascade
    model.predict(batch, budget_ms=4.0)   # deepest exit whose profiled latency fits
    model.predict(batch, threshold=0.9, budget_ms=4.0)  # cascade with a deadline
    model.predict(batch, exit=2)          # one fixed exit
    model.predict(batch)                  # the manifest's calibrated thresholds

The cascade runs segment 1 on the whole batch, answers the samples the policy lets go,
runs segment 2 on the rest only (the batch is compacted; answers keep the input order),
and so on. Exits whose threshold is off are skipped, branches included: where the backend
joins segments (ONNX Runtime, PyTorch), the sections up to the next exit that is on run as
one span. `run` returns the batch's answers (Python values, and the class probabilities
for top-k) with what was run, for servers and benchmarks; `predict` returns one
`Prediction` per sample.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge.errors import ByotError
from byot_edge.manifest import Manifest, Thresholds, load_manifest
from byot_edge.plans import Plan
from byot_edge.runtime.backends import (
    EXIT,
    SEGMENT,
    ArtifactIO,
    Backend,
    artifact_name,
    get_backend,
    span_name,
)
from byot_edge.runtime.gates import GATE, ExitGates, Gate
from byot_edge.runtime.latency import Latencies, resolve, select_profile
from byot_edge.runtime.policies import (
    NEVER,
    ConfidenceThresholds,
    Deadline,
    Policy,
    Softmax,
    Step,
    deepest_exit_within,
    exits_to_compute,
    uses_earlier_exits,
)
from byot_edge.runtime.precision import backend_precision_note, threshold_precision_note
from byot_edge.runtime.preprocess import check_batch
from byot_edge.runtime.requests import CascadeResult, Prediction, PredictOptions


class AnytimeModel:
    def __init__(self, manifest: Manifest, backend: Backend) -> None:
        self.manifest = manifest
        self.backend = backend
        self._warned: set[str] = set()
        self._plans: dict[Plan, list[tuple[int, list[str], list[ArtifactIO]]]] = {}
        self._exit_files: dict[int, list[tuple[str, ArtifactIO]]] = {}  # see _fixed
        # (batch size, statistic) -> the profile's figures for this backend and device
        self._latencies: dict[tuple[int, str], Latencies | None] = {}
        self._calibrated: tuple[Thresholds, ConfidenceThresholds | ExitGates] | None = None
        # Precision mismatches (runtime/precision.py), said through the warnings below
        self._backend_note = backend_precision_note(manifest, backend)
        self._threshold_note: tuple[Thresholds, str | None] | None = None

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", device: str | None = None,
             **backend_options: Any) -> AnytimeModel:
        manifest = load_manifest(path)
        return cls(manifest, get_backend(backend, manifest, device=device, **backend_options))

    @property
    def num_exits(self) -> int:
        return self.manifest.num_exits

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    def predict(self, batch: Any, *, threshold: float | Sequence[float] | None = None,
                budget_ms: float | None = None, exit: int | None = None,
                criterion: str | None = None, stat: str = "p50") -> list[Prediction]:
        """One Prediction per sample of `batch` ([N, C, H, W], normalised as the manifest says)."""
        options = PredictOptions(threshold, budget_ms, exit, criterion, stat)
        return self.run(batch, options, probabilities=False).predictions(self.class_names)

    def run(self, batch: Any, options: PredictOptions | None = None, *,
            probabilities: bool = True) -> CascadeResult:
        """The answers for `batch` as a CascadeResult; `probabilities`: whether it keeps
        each sample's class probabilities (for top-k answers)."""
        options = options or PredictOptions()
        options.validate(self.num_exits)
        return self.run_checked(check_batch(batch, self.manifest.input), options,
                                probabilities)

    def run_checked(self, x: np.ndarray, options: PredictOptions,
                    probabilities: bool = True,
                    time_left_ms: Sequence[float] | None = None) -> CascadeResult:
        """`run` without checking again what the caller checked: `x` as check_batch returns
        it, `options` validated (a server checks each request once, on arrival).

        `time_left_ms`: per sample, the time its request has left (a server's deadline, less
        what the queue took). A cascade then stops each sample before its next step would
        overrun that (as budget_ms does for the whole batch); a budget alone takes the
        tightest; a fixed exit is not shortened."""
        notes: list[str] = [self._backend_note] if self._backend_note else []
        p = probabilities
        budgets = _budgets(options.budget_ms, time_left_ms, len(x))
        if options.exit is not None:
            result = self._fixed(x, options.exit, "exit", p)
        elif options.budget_ms is not None and options.threshold is None:
            tightest = replace(options, budget_ms=min(budgets)) if budgets else options
            result = self._fixed(x, self._exit_for_budget(len(x), tightest, notes), "budget", p)
        else:
            policy = self.threshold_policy(options.threshold, options.criterion)
            if policy is not None and options.threshold is None:
                notes += self._calibrated_precision_notes()
            if policy is None:
                notes.append("no thresholds given and none calibrated in the manifest: answering "
                             "from the deepest exit; run `byot-edge calibrate` or pass threshold")
                result = self._fixed(x, self.num_exits, "exit", p)
            elif budgets is not None:
                budget = budgets if time_left_ms is not None else budgets[0]
                result = self._cascade(x, Deadline(budget, policy), options, notes,
                                       probabilities=p)
            elif policy.active_exits(self.num_exits).full_network and self.backend.has(
                    artifact_name(EXIT, self.num_exits)):
                # Every shallow exit is off: the full network alone does the same, without
                # the cascade's steps (calibration costs this case the same way).
                result = self._fixed(x, self.num_exits, "exit", p)
            else:
                result = self._cascade(x, policy, options, notes, probabilities=p)
        if notes or result.warnings:
            result.warnings = notes + result.warnings
            for note in result.warnings:
                if note not in self._warned:  # each distinct warning once per model
                    self._warned.add(note)
                    warnings.warn(note, RuntimeWarning, stacklevel=2)
        return result

    def run_policy(self, batch: Any, policy: Policy, plan: Plan | Sequence[int] | None = None,
                   *, probabilities: bool = True) -> CascadeResult:
        """The cascade under any policy. `plan` lists the exits whose logits are computed
        (default: those the policy can answer from); with thresholds that are all off and
        a calibrated plan, it measures the worst case: every sample through every step."""
        x = check_batch(batch, self.manifest.input)
        return self._cascade(x, policy, PredictOptions(), [],
                             None if plan is None else Plan.of(plan), probabilities)

    def threshold_policy(self, threshold: float | Sequence[float] | None = None,
                         criterion: str | None = None) -> ConfidenceThresholds | ExitGates | None:
        """The request's thresholds, else the manifest's; calibrated temperatures apply to
        both (they describe the exits' logits, not the thresholds). A manifest calibrated
        with learned gates answers a request's thresholds with its gates' scores."""
        cal = self.manifest.thresholds
        temps = cal.temperatures if cal else None
        if threshold is None:
            if cal is None:
                return None
            if criterion is not None and criterion != cal.criterion:
                raise ByotError(f"the manifest's thresholds are for {cal.criterion}; pass "
                                f"threshold along with criterion {criterion!r}")
            if self._calibrated is None or self._calibrated[0] is not cal:  # built once
                self._calibrated = (cal, self._policy(cal, cal.values, cal.criterion))
            return self._calibrated[1]
        crit = criterion or (cal.criterion if cal else "max_softmax")
        if cal is not None and crit == GATE:
            return self._policy(cal, threshold, crit)
        return ConfidenceThresholds.for_model(threshold, self.num_exits, crit, temps)

    def _policy(self, cal: Thresholds, values: float | Sequence[float],
                criterion: str) -> ConfidenceThresholds | ExitGates:
        """The manifest's kind of policy (confidence thresholds or gates) at `values`."""
        if criterion == GATE:
            where = f"{self.manifest.root / 'manifest.json'}"
            gates = [Gate.from_dict(g, where) for g in cal.gates or []]
            return ExitGates.for_model(gates, values, self.num_exits, cal.temperatures)
        return ConfidenceThresholds.for_model(values, self.num_exits, criterion,
                                              cal.temperatures)

    def _calibrated_precision_notes(self) -> list[str]:
        """The warning when the manifest's thresholds were fitted on another precision than
        the backend's files (worked out once per thresholds object)."""
        cal = self.manifest.thresholds
        if cal is None:
            return []
        if self._threshold_note is None or self._threshold_note[0] is not cal:
            self._threshold_note = (cal, threshold_precision_note(cal, self.backend))
        note = self._threshold_note[1]
        return [note] if note else []

    def warmup(self, batch_size: int = 1) -> None:
        """Load every artifact and run each once, so the first request is not the slow one."""
        x = np.zeros((batch_size, *self.manifest.input.shape), self.manifest.input.dtype)
        if self.has_segments():
            never = ConfidenceThresholds.for_model(NEVER, self.num_exits)
            plans = {Plan.every_exit(self.num_exits)}
            calibrated = self.threshold_policy()
            if calibrated is not None:
                plans.add(calibrated.active_exits(self.num_exits))
            for plan in sorted(plans):
                self._cascade(x, never, PredictOptions(), [], plan)
        for k in range(1, self.num_exits + 1):
            if self.backend.has(artifact_name(EXIT, k)):
                self._fixed(x, k, "exit")

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> AnytimeModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _temperature(self, k: int) -> float:
        cal = self.manifest.thresholds
        return cal.temperatures[k - 1] if cal and cal.temperatures else 1.0

    def has_segments(self) -> bool:
        """Whether the backend has every segment, so the cascade can run."""
        return all(self.backend.has(artifact_name(SEGMENT, k))
                   for k in range(1, self.num_exits + 1))

    def _whole(self, k: int, logits: np.ndarray, ms: float, mode: str, probabilities: bool,
               sm: Softmax | None = None) -> CascadeResult:
        """Exit k answers every sample. `sm`: softmax(logits) at exit k's temperature, where
        the caller has it; `probabilities`: whether to keep the class probabilities."""
        sm = sm or Softmax(logits, self._temperature(k))
        n = len(logits)
        result = CascadeResult(sm.classes, sm.scores, [k] * n, [ms] * n, mode)
        if probabilities:
            result.probabilities = sm.probabilities()
        return result

    def _answer(self, result: CascadeResult, active: list[int], answer: list[bool] | None,
                k: int, ms: float, sm: Softmax, probabilities: bool) -> None:
        """Exit k answers the running samples `active` (positions in the batch) that
        `answer` lets go (None: all of them); `sm`: their softmax at its temperature."""
        rows = range(len(active)) if answer is None else [i for i, go in enumerate(answer) if go]
        classes, scores = sm.classes, sm.scores  # as an offline replay takes them
        for i in rows:
            j = active[i]
            result.indices[j], result.confidences[j] = classes[i], scores[i]
            result.exits[j], result.latency_ms[j] = k, ms
        if probabilities:
            p = sm.probabilities()
            if result.probabilities is None:
                result.probabilities = np.zeros((len(result.indices), p.shape[-1]))
            result.probabilities[[active[i] for i in rows]] = p[list(rows)]

    def _empty(self, n: int, mode: str) -> CascadeResult:
        return CascadeResult([0] * n, [0.0] * n, [0] * n, [0.0] * n, mode)

    def _fixed(self, x: np.ndarray, k: int, mode: str,
               probabilities: bool = True) -> CascadeResult:
        """Exit k for everyone: its truncated file in one call, else segments 1..k (joined
        into one span where the backend can)."""
        files = self._exit_files.get(k)
        if files is None:  # chosen and loaded once, before any clock starts
            names = next(([name] for name in (artifact_name(EXIT, k), span_name(1, k))
                          if self.backend.has(name)),
                         [artifact_name(SEGMENT, j) for j in range(1, k + 1)])
            files = self._exit_files[k] = [(name, self.backend.load(name)) for name in names]
        calls = []
        t0 = time.perf_counter()
        h = x
        for j, (name, io) in enumerate(files, start=1):
            out = self.backend.run(name, {io.input: h})
            h = out[io.section] if io.section and j < len(files) else out[io.logits]
            calls.append((name, len(x)))
        result = self._whole(k, h, (time.perf_counter() - t0) * 1e3, mode, probabilities)
        result.calls = calls
        return result

    def _profiled(self, n: int, stat: str, notes: list[str]) -> Latencies | None:
        """The profile's figures for this backend and device at batch n, resolved once per
        (n, stat); its warning (another backend or device) goes into `notes`."""
        key = (n, stat)
        if key not in self._latencies:
            choice = select_profile(self.manifest, self.backend.name, self.backend.device, n)
            self._latencies[key] = None if choice is None else resolve(choice, stat)
        lat = self._latencies[key]
        if lat is not None and lat.warning and lat.warning not in notes:
            notes.append(lat.warning)
        return lat

    def first_answer_ms(self, n: int, options: PredictOptions) -> float | None:
        """By the profile (options.stat), the time a batch of n under `options` takes until
        its first samples can be answered: the cascade's first step, or the fixed exit a
        request names, or exit 1 under a budget alone. None without a profile. What a
        server compares a request's time left with before running it."""
        lat = self._profiled(n, options.stat, [])
        if lat is None:
            return None
        if options.exit is not None:
            return lat.exits[options.exit - 1]
        policy = None if options.threshold is None and options.budget_ms is not None \
            else self.threshold_policy(options.threshold, options.criterion)
        if policy is None:  # a budget alone (exit 1 at least), or no thresholds (deepest)
            return lat.exits[0] if options.budget_ms is not None else lat.exits[-1]
        plan = policy.active_exits(self.num_exits)
        step = lat.step_ms(plan, 0)
        return step if step is not None else lat.exits[plan.exits[0] - 1]

    def _exit_for_budget(self, n: int, options: PredictOptions, notes: list[str]) -> int:
        """The deepest exit whose profiled latency (options.stat) fits the budget."""
        assert options.budget_ms is not None
        lat = self._profiled(n, options.stat, notes)
        if lat is None:
            raise ByotError(f"budget_ms needs a latency profile and the manifest has none; run "
                            f"`byot-edge profile {self.manifest.root / 'manifest.json'} --backend "
                            f"{self.backend.name}` first, or pass a threshold for a deadline "
                            "cascade")
        latency = lat.exits
        k = deepest_exit_within(latency, options.budget_ms)
        if k is None:
            notes.append(f"no exit fits a budget of {options.budget_ms:g} ms (exit 1 takes "
                         f"{latency[0]:.3g} ms {options.stat} at batch {n}); answering from exit 1")
            k = 1
        return k

    def _next_cost_ms(self, plan: Plan, j: int, n: int, last_ms: float,
                      options: PredictOptions, notes: list[str]) -> float:
        """Predicted time of step j+1 of `plan` (the sections up to the next exit that is on)
        on (at most) the n samples that ran step j: from the profile, else the time step j
        took per section, times its sections (a backbone's sections are FLOP-balanced)."""
        lat = self._profiled(n, options.stat, notes)
        nxt = lat.step_ms(plan, j + 1) if lat is not None else None
        if nxt is not None:
            return nxt
        note = ("no segment latency profile for this backend: the deadline estimates each "
                "step from the previous one; run `byot-edge profile` for a better estimate")
        if note not in notes:
            notes.append(note)
        (first, last), (nxt_first, nxt_last) = plan.steps()[j:j + 2]
        return last_ms / (last - first + 1) * (nxt_last - nxt_first + 1)

    def _steps(self, plan: Plan) -> list[tuple[int, list[str], list[ArtifactIO]]]:
        """Per step of a cascade answering only at `plan`'s exits: (its exit, the names of
        the files it runs, their inputs and outputs). One span per step where the backend
        joins segments, else the segments (whose extra logits are computed and ignored)."""
        if plan not in self._plans:
            plan.check(self.num_exits)
            if not self.has_segments():
                missing = next(k for k in range(1, self.num_exits + 1)
                               if not self.backend.has(artifact_name(SEGMENT, k)))
                self.backend.load(artifact_name(SEGMENT, missing))  # raises: re-export hint
            steps = []
            for first, k in plan.steps():
                span = span_name(first, k)
                names = ([span] if self.backend.has(span)
                         else [artifact_name(SEGMENT, j) for j in range(first, k + 1)])
                steps.append((k, names, [self.backend.load(n) for n in names]))
            self._plans[plan] = steps
        return self._plans[plan]

    def _cascade(self, x: np.ndarray, policy: Policy, options: PredictOptions,
                 notes: list[str], plan: Plan | None = None,
                 probabilities: bool = True) -> CascadeResult:
        deadline = isinstance(policy, Deadline)
        mode = "deadline" if deadline else "cascade"
        num_exits = self.num_exits
        plan = plan or exits_to_compute(policy, num_exits)
        steps = self._steps(plan)  # loads, untimed
        calls: list[tuple[str, int]] = []
        step_ms: list[tuple[int, float]] = []
        # Until a step lets only some samples go, the whole batch is running: no answer
        # arrays to fill and no indices to carry (`result` and `active` stay None).
        result: CascadeResult | None = None
        active: list[int] | None = None
        h = x
        # The earlier exits' probabilities of the samples still running, for policies that
        # read them (learned gates); None for the others, which pay nothing for it.
        earlier: list[list[list[float]]] | None = [] if uses_earlier_exits(policy) else None
        t0 = time.perf_counter()
        for j, (k, names, ios) in enumerate(steps):
            t_seg = time.perf_counter()
            for name, io in zip(names, ios, strict=True):
                out = self.backend.run(name, {io.input: h})
                calls.append((name, len(h)))
                if io.section is not None:
                    h = out[io.section]
            now = time.perf_counter()
            elapsed = (now - t0) * 1e3
            step_ms.append((k, elapsed))
            logits = out[ios[-1].logits]
            nxt = None
            if deadline and k < num_exits:
                nxt = self._next_cost_ms(plan, j, len(h), (now - t_seg) * 1e3, options, notes)
            step = Step(k, num_exits, logits, elapsed, nxt, earlier, active)
            answer = None if k == num_exits else _mask(policy(step), len(h))
            answered = len(h) if answer is None else sum(answer)
            if earlier is not None and answered < len(h):
                earlier = [*earlier, step.softmax(self._temperature(k)).exp_rows()]
            if not answered:
                continue
            sm = step.softmax(self._temperature(k))  # the policy's, where it took one
            if answered == len(h):  # everyone still running answers here
                if result is None:
                    result = self._whole(k, logits, elapsed, mode, probabilities, sm)
                else:
                    assert active is not None
                    self._answer(result, active, None, k, elapsed, sm, probabilities)
                break
            if result is None:
                result, active = self._empty(len(x), mode), list(range(len(x)))
            assert answer is not None and active is not None
            self._answer(result, active, answer, k, elapsed, sm, probabilities)
            # Compact: only the samples still running go on to the next step.
            keep = [i for i, go in enumerate(answer) if not go]
            h, active = h[keep], [active[i] for i in keep]
            if earlier is not None:
                earlier = [[rows[i] for i in keep] for rows in earlier]
        assert result is not None  # the deepest step answers everyone
        result.calls, result.step_ms = calls, step_ms
        return result


def _budgets(budget_ms: float | None, time_left_ms: Sequence[float] | None,
             n: int) -> tuple[float, ...] | None:
    """Per sample, the tighter of the request's budget and the time it has left; None
    when neither is set."""
    if time_left_ms is None:
        return None if budget_ms is None else (budget_ms,) * n
    if len(time_left_ms) != n:
        raise ByotError(f"time_left_ms lists {len(time_left_ms)} samples for a batch of {n}")
    cap = float("inf") if budget_ms is None else budget_ms
    return tuple(min(cap, float(t)) for t in time_left_ms)


def _mask(answer: Sequence[bool] | np.ndarray, n: int) -> list[bool]:
    """A policy's answer as n Python booleans."""
    mask = (answer if type(answer) is list  # ConfidenceThresholds' own
            else answer.tolist() if isinstance(answer, np.ndarray) else [bool(a) for a in answer])
    if len(mask) != n:
        raise ByotError(f"the exit policy answered {len(mask)} samples for {n}; a policy must "
                        "answer one boolean per sample still running")
    return mask
