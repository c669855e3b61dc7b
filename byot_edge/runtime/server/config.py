"""The server's settings (the `byot-edge serve` options), checked once when made."""

from __future__ import annotations

import re
from dataclasses import dataclass

from byot_edge.errors import ByotError
from byot_edge.runtime.decode import Limits
from byot_edge.runtime.server.deadlines import MAX_DEADLINE_MS
from byot_edge.triton.protocol import DEFAULT_MODEL_NAME

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 32  # samples per model run
    max_wait_ms: float = 2.0  # once the model is free, longest a batch waits for more
    max_queue: int = 64  # requests held at once once their body is in (decoding, queued, running)
    max_upload_mb: float = 10.0
    # The bytes of request bodies held at once (being read or decoded), server-wide; a
    # request that would go past it gets 503 before its body is read. None: 4 uploads at
    # the limit, at least 64 MiB.
    max_bodies_mb: float | None = None
    # Connections uvicorn keeps at once (its limit_concurrency: 503 past it). Each holds up
    # to 64 KiB of a body nobody reads yet, so this bounds that memory; /healthz shares it.
    max_connections: int = 1024
    token: str | None = None  # bearer token for /v1/* and /metrics; None: no auth
    max_image_pixels: int = 4096 * 4096  # decoded size limit: a small PNG can be huge
    max_request_pixels: int = 2 * 4096 * 4096  # all of one request's images together
    body_timeout_s: float = 30.0  # the whole body must arrive within this (408 after)
    default_top_k: int = 5
    warmup: bool = True
    shutdown_timeout_s: int = 30  # how long SIGTERM waits for in-flight requests
    # POST /v1/predict's common case without FastAPI's per-request work (server.fast);
    # False: every request through the FastAPI route (the same answers, slower).
    fast_path: bool = True
    # The model's name on the Open Inference Protocol routes (/v2/models/{name}/...), so a
    # client written for a Triton model of that name works unchanged.
    model_name: str = DEFAULT_MODEL_NAME
    # Degrade before dropping: every request whose depth is not fixed gets this deadline
    # (its own when tighter), so under load answers come from shallower exits rather than
    # late (docs/serving.md, "Deadlines"). None: off.
    slo_ms: float | None = None
    # With slo_ms: while the server is busier than this share of its CPUs (or the model
    # runs this share of the time), batches answer at their first exits, so that bursts
    # find headroom rather than a full core (runtime/busy.py). 1: only the queue decides.
    slo_busy: float = 0.7
    # After warm-up, move every object alive then out of the garbage collector's reach
    # (gc.collect, then gc.freeze): a full collection over them paused a loaded server for
    # 35-52 ms, every few seconds, and 0.5 ms once they were frozen. `serve` sets it; off by
    # default for apps made in a process that makes many (tests), where frozen objects
    # could never be collected once they die in a cycle.
    freeze_gc: bool = False
    # The online audit: this share of the samples answered before the deepest exit also
    # run to it, off the request's path, to watch the exits' agreement (runtime/audit.py).
    audit_rate: float = 0.0

    def __post_init__(self) -> None:
        checks = {"max_batch": self.max_batch >= 1, "max_wait_ms": self.max_wait_ms >= 0,
                  "max_queue": self.max_queue >= 1, "max_upload_mb": self.max_upload_mb > 0,
                  "max_connections": self.max_connections >= 1,
                  "max_image_pixels": self.max_image_pixels >= 1,
                  "max_request_pixels": self.max_request_pixels >= 1,
                  "body_timeout_s": self.body_timeout_s > 0,
                  "default_top_k": self.default_top_k >= 1,
                  "shutdown_timeout_s": self.shutdown_timeout_s >= 0}
        bad = [f"{k} (--{k.replace('_', '-')} {getattr(self, k)})"
               for k, ok in checks.items() if not ok]
        if bad:
            raise ByotError(f"invalid server settings: {', '.join(bad)} out of range "
                            "(max_wait_ms and shutdown_timeout_s >= 0, the others positive)")
        if self.max_bodies_mb is not None and not self.max_bodies_mb >= self.max_upload_mb:
            raise ByotError(f"--max-bodies-mb {self.max_bodies_mb:g} is below --max-upload-mb "
                            f"{self.max_upload_mb:g}: the server could not take one upload at "
                            "the limit; raise it (or leave it unset)")
        if self.slo_ms is not None and not (0 < self.slo_ms <= MAX_DEADLINE_MS):
            raise ByotError(f"--slo-ms must be a number of milliseconds in (0, "
                            f"{MAX_DEADLINE_MS:g}], got {self.slo_ms}")
        if not 0 < self.slo_busy <= 1:
            raise ByotError(f"--slo-busy is a share of the server's CPUs in (0, 1] (e.g. 0.7; "
                            f"1 turns the rule off), got {self.slo_busy}")
        if not 0 <= self.audit_rate <= 1:
            raise ByotError(f"--audit-rate is the share of early answers to audit, in [0, 1] "
                            f"(e.g. 0.02), got {self.audit_rate}")
        if not MODEL_NAME.fullmatch(self.model_name):
            raise ByotError(f"invalid model name {self.model_name!r} (--model-name): use "
                            "letters, digits, '.', '_' and '-', as a URL path segment, "
                            "starting with a letter or digit")
        if self.token is not None and not self.token.strip():
            raise ByotError("the bearer token is empty; pass a non-empty --token or unset "
                            "BYOT_EDGE_TOKEN")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_bodies_bytes(self) -> int:
        mb = self.max_bodies_mb
        return int((max(64.0, 4 * self.max_upload_mb) if mb is None else mb) * 2**20)

    @property
    def limits(self) -> Limits:
        """What one request may hold, for decode_body."""
        return Limits(self.max_batch, self.max_image_pixels, self.max_request_pixels)
