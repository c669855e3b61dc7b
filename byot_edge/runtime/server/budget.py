"""The bytes of request bodies the server holds at once, server-wide.

    budget = BodyBudget(64 * 2**20)
    with budget.hold() as hold:       # one request
        hold.reserve(declared)        # before reading: its Content-Length
        hold.reserve(received)        # while reading: what has arrived (chunked bodies)
        ...decode...
    # released: the body is decoded (or refused)

Without it, memory grew with the connections: every client's body was read before a queue
slot was taken, so 64 clients sending 5 MB each held 320 MB of bodies, twice over while
their chunks were joined, and more while they were parsed (issue 27: 148 MiB -> 1,173 MiB
resident). With it, a request whose body would take the bytes held past the limit is
answered 503 with Retry-After before its body is read. A request alone in the server is
always let in, so any body under the upload limit can get through.

No lock: reservations are made on the event loop only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from byot_edge.errors import RequestError
from byot_edge.runtime.metrics import ServerMetrics

MIB = 2**20


class BodyBudget:
    def __init__(self, limit: int, metrics: ServerMetrics | None = None) -> None:
        self.limit = limit
        self.held = 0  # bytes reserved by the requests being read or decoded
        self.metrics = metrics

    @contextmanager
    def hold(self) -> Iterator[BodyHold]:
        """One request's reservation, released when the block ends."""
        hold = BodyHold(self)
        try:
            yield hold
        finally:
            hold.release()

    def refuse(self, wanted: int) -> RequestError:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason="uploads").inc()
        return RequestError(503, f"the server is receiving too many uploads at once "
                                 f"({self.held / MIB:.1f} MiB held, this request needs "
                                 f"{wanted / MIB:.1f} MiB more, the limit is "
                                 f"{self.limit / MIB:g} MiB: --max-bodies-mb); retry in a "
                                 "moment", 1)


class BodyHold:
    """What one request holds of the budget; it only grows until released."""

    __slots__ = ("budget", "bytes")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def reserve(self, n: int) -> None:
        """Hold at least `n` bytes; 503 when others hold bytes and `n` would go past the
        limit (nothing is reserved then)."""
        extra = n - self.bytes
        if extra <= 0:
            return
        budget = self.budget
        others = budget.held - self.bytes
        if others > 0 and budget.held + extra > budget.limit:
            raise budget.refuse(extra)
        budget.held += extra
        self.bytes = n

    def release(self) -> None:
        self.budget.held -= self.bytes
        self.bytes = 0
