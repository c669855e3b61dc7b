"""A cascade plan: the exits that are on, in increasing order, ending at the deepest.

    Plan.parse("1,3,4").key == "1,3,4"
    Plan.from_thresholds([0.9, 2.0, 0.8], num_exits=4).exits == (1, 3, 4)

An exit whose threshold is off (above 1: confidence scores lie in [0, 1]) is not in the plan:
the cascade computes neither its branch nor, where the backend joins segments, a separate
call for its section. The runtime runs a plan step by step, calibration prices it, and the
profile times it under its key. With every shallow exit off the plan is the deepest exit
alone, which the truncated full network answers just as well, without the cascade's steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from byot_edge.errors import ByotError


@dataclass(frozen=True, order=True)
class Plan:
    exits: tuple[int, ...]

    def __post_init__(self) -> None:
        e = self.exits
        if not e or e[0] < 1 or any(b <= a for a, b in itertools.pairwise(e)):
            raise ByotError(f"a cascade plan lists exits (1, 2, ...) in increasing order and "
                            f"ends at the deepest, got {list(e)}")

    @classmethod
    def of(cls, plan: Plan | Sequence[int]) -> Plan:
        return plan if isinstance(plan, Plan) else cls(tuple(int(k) for k in plan))

    @classmethod
    def parse(cls, key: str) -> Plan:
        """From a profile's key, "1,3,4"."""
        try:
            return cls(tuple(int(k) for k in key.split(",")))
        except ValueError:
            raise ByotError(f"{key!r} is not a cascade plan like \"1,3,4\"; re-run "
                            "`byot-edge profile`") from None

    @classmethod
    def every_exit(cls, num_exits: int) -> Plan:
        return cls(tuple(range(1, num_exits + 1)))

    @classmethod
    def from_thresholds(cls, values: Sequence[float], num_exits: int) -> Plan:
        """The exits a cascade over these thresholds (one per exit 1..K-1) can answer from."""
        return cls((*(k for k, v in enumerate(values, start=1) if v <= 1), num_exits))

    @property
    def key(self) -> str:
        return ",".join(map(str, self.exits))

    @property
    def deepest(self) -> int:
        return self.exits[-1]

    @property
    def full_network(self) -> bool:
        """Every shallow exit off: the truncated full network alone answers as the plan does."""
        return len(self.exits) == 1

    def steps(self) -> list[tuple[int, int]]:
        """(first section, exit) of each step: step j runs sections first..exit."""
        firsts = (1, *(k + 1 for k in self.exits[:-1]))
        return list(zip(firsts, self.exits, strict=True))

    def check(self, num_exits: int) -> Plan:
        if self.deepest != num_exits:
            raise ByotError(f"a cascade plan ends at the deepest exit ({num_exits}), got "
                            f"{list(self.exits)}")
        return self

    def __iter__(self) -> Iterator[int]:
        return iter(self.exits)

    def __len__(self) -> int:
        return len(self.exits)


def all_plans(num_exits: int) -> list[Plan]:
    """Every plan a calibration can choose (some shallow exits on, then the deepest), the one
    with every exit on last."""
    return [Plan((*(k for k in range(1, num_exits) if mask >> (k - 1) & 1), num_exits))
            for mask in range(2 ** (num_exits - 1))]
