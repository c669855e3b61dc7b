"""Latency profiles as typed records, and their JSON form in the manifest.

A profile belongs to one backend, one device and one batch size, and records the precision
of the files it timed (fp32 figures do not price int8 files); every figure is `Stats` in
milliseconds for the whole batch. The JSON form (`manifest.json`, "latency_profiles") is one
entry per exit, `{"exit": k, "truncated": {p50, p90, p99, mean, runs}, "segment": {...},
"spans": {"i": {...}}}`, the deepest exit's entry also holding "plans" and "cascade"
(see `LatencyProfile`). It is parsed here once, when the manifest loads, and written back
in the same layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from byot_edge.errors import ByotError
from byot_edge.plans import Plan
from byot_edge.timing import Stats

FIX = "re-run `byot-edge profile`"


@dataclass(frozen=True)
class ExitTiming:
    """What a profile timed for exit k."""

    exit: int
    truncated: Stats | None = None  # the truncated network: input -> exit k's logits
    segment: Stats | None = None  # segment k alone: section k and exit k's branch
    # first exit i (< k) -> segments i..k joined, as a cascade runs them when exits i..k-1
    # are off (backends that cannot join segments have none)
    spans: Mapping[int, Stats] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"exit": self.exit}
        for what in ("truncated", "segment"):
            stats = getattr(self, what)
            if stats is not None:
                d[what] = stats.to_dict()
        if self.spans:
            d["spans"] = {str(i): s.to_dict() for i, s in self.spans.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExitTiming:
        def stats(what: str) -> Stats | None:
            return _stats(d[what], f"exit {d['exit']} {what}") if what in d else None

        spans = {int(i): _stats(s, f"span {i}-{d['exit']}")
                 for i, s in d.get("spans", {}).items()}
        return cls(int(d["exit"]), stats("truncated"), stats("segment"), spans)


@dataclass(frozen=True)
class LatencyProfile:
    backend: str
    device: str
    batch: int
    exits: list[ExitTiming]  # per exit, 1..K
    created: str = ""
    # What the runtime itself takes, timed through the anytime model with no sample
    # answered early (stored on the deepest exit's entry):
    # the whole call with every exit on, the worst case of that plan;
    cascade: Stats | None = None
    # for every plan, the time from the first step's start to the end of each of its steps
    plans: Mapping[Plan, tuple[Stats, ...]] = field(default_factory=dict)
    # What the timed files computed in ("fp32", "fp16", "int8"): another precision's files
    # run at other speeds. None in profiles written before it was recorded.
    precision: str | None = None

    def exit(self, k: int) -> ExitTiming:
        found = [e for e in self.exits if e.exit == k]
        if not found:
            raise ByotError(f"the latency profile of {self.backend} at batch {self.batch} has "
                            f"no entry for exit {k}; {FIX}")
        return found[0]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as the manifest stores it."""
        entries = [e.to_dict() for e in self.exits]
        if entries and self.plans:
            entries[-1]["plans"] = {p.key: [s.to_dict() for s in at]
                                    for p, at in self.plans.items()}
        if entries and self.cascade is not None:
            entries[-1]["cascade"] = self.cascade.to_dict()
        precision = {} if self.precision is None else {"precision": self.precision}
        return {"backend": self.backend, "device": self.device, "batch": self.batch,
                **precision, "exits": entries, "created": self.created}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyProfile:
        try:
            entries = sorted(d["exits"], key=lambda e: int(e["exit"]))
            exits = [ExitTiming.from_dict(e) for e in entries]
            last = entries[-1] if entries else {}
            cascade = _stats(last["cascade"], "cascade") if "cascade" in last else None
            plans = {Plan.parse(key): tuple(_stats(s, f"plan {key}") for s in at)
                     for key, at in last.get("plans", {}).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ByotError(f"a latency profile of {d.get('backend')} at batch "
                            f"{d.get('batch')} is malformed ({e!r}); {FIX}") from None
        precision = d.get("precision")
        return cls(str(d["backend"]), str(d["device"]), int(d["batch"]), exits,
                   str(d.get("created", "")), cascade, plans,
                   None if precision is None else str(precision))

    def check(self, num_exits: int) -> None:
        """What the schema cannot say: one entry per exit of the model, plans ending at K."""
        have = [e.exit for e in self.exits]
        if have != list(range(1, num_exits + 1)):
            raise ByotError(f"a latency profile of {self.backend} at batch {self.batch} has "
                            f"entries for exits {have}, the model has 1..{num_exits}; {FIX}")
        for plan, at in self.plans.items():
            plan.check(num_exits)
            if len(at) != len(plan):
                raise ByotError(f"plan {plan.key} of a latency profile has {len(at)} steps "
                                f"timed, not {len(plan)}; {FIX}")


def _stats(d: Mapping[str, Any], what: str) -> Stats:
    missing = [s for s in ("p50", "p90", "p99", "mean") if s not in d]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)}")
    return Stats.from_dict(d)
