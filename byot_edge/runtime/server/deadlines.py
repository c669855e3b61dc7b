"""A request's deadline: where a client gives it, how it is checked, and the server's SLO.

A deadline is milliseconds, counted from the moment the server has the request's body, by
which its answer must be ready: in the query (`deadline_ms`), in the `X-Deadline-Ms`
header (what a proxy can add), or as a /v2 request parameter. Given twice, the tighter
one holds; `serve --slo-ms` gives every request whose depth is not fixed (no `exit`) that
deadline too. The batcher turns it into a time (runtime/batching.py).
"""

from __future__ import annotations

import math
from typing import Any

from byot_edge.errors import RequestError

HEADER = "x-deadline-ms"
# An hour: a longer "deadline" is no deadline, most likely a unit mistake (seconds, µs).
MAX_DEADLINE_MS = 3_600_000.0


def parse_deadline_ms(value: Any, where: str) -> float | None:
    """`value` (text from a query or header, or a JSON number) as milliseconds, or None
    when absent; anything else is a 400 that says what a deadline is."""
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or not 0 < number <= MAX_DEADLINE_MS:
        raise RequestError(400, f"{where} must be a number of milliseconds in (0, "
                                f"{MAX_DEADLINE_MS:g}], counted from when the server has "
                                f"the request's body (e.g. 50), got {str(value)[:40]!r}")
    return number


def tightest(*deadlines_ms: float | None) -> float | None:
    """The smallest deadline given, or None."""
    given = [d for d in deadlines_ms if d is not None]
    return min(given) if given else None
