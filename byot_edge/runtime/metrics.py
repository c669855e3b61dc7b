"""Prometheus metrics of the HTTP server, in a registry of its own.

A registry per app (not prometheus-client's global one) so that several apps in one
process, as in tests, each count only their own requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds: a small model answers in a millisecond or two on a GPU, a big one on a CPU in
# hundreds; the default buckets start at 5 ms and would lump every fast answer together.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """Everything /metrics exposes; the server and the batcher report into it."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, num_exits: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("byot_edge_http_requests", "HTTP requests answered, by "
                                "endpoint and status code", ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram(
            "byot_edge_http_request_duration_seconds", "Server-side time from a request's "
            "arrival to its answer, by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=r)
        self.rejected = Counter("byot_edge_rejected_requests", "Prediction requests refused "
                                "before running, by reason (deadline: 504, the others 503)",
                                ["reason"], registry=r)
        self.deadline_missed = Counter("byot_edge_deadline_missed", "Requests answered after "
                                       "their deadline (late as their response was made)",
                                       registry=r)
        self.exits = Counter("byot_edge_exits", "Samples answered, by the exit that answered",
                             ["exit"], registry=r)
        for k in range(1, num_exits + 1):  # every exit shows up, at 0, from the start
            self.exits.labels(exit=str(k))
        self.batch_size = Histogram("byot_edge_batch_size", "Samples per model run (one "
                                    "dynamic batch of requests with the same options)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("byot_edge_batch_requests", "Requests per model run",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram("byot_edge_inference_duration_seconds", "Time of "
                                           "one model run (the whole batch's cascade)",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("byot_edge_queue_wait_duration_seconds", "Time a "
                                       "request waited for its batch to start",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("byot_edge_queue_depth", "Requests waiting for a batch",
                                 registry=r)
        self.receiving = Gauge("byot_edge_requests_receiving", "Prediction requests whose "
                               "body is still arriving (they hold no queue slot)", registry=r)
        self.in_flight = Gauge("byot_edge_requests_in_flight", "Prediction requests held by "
                               "the server (being read, waiting or running); bounded by "
                               "--max-queue", registry=r)
        # Degrade before dropping (serve --slo-ms; runtime/busy.py)
        self.busy = Gauge("byot_edge_busy_share", "Share of its CPUs (or of the time, for "
                          "the model) the server used lately, as --slo-ms reads it",
                          registry=r)
        self.degraded = Counter("byot_edge_degraded_batches", "Model runs answered at their "
                                "first exits because the server was busy or had shed "
                                "(--slo-ms)", registry=r)
        # The online audit (runtime/audit.py), per shallow exit
        exit_label = ["exit"]
        self.audit_samples = Counter("byot_edge_audit_samples", "Early answers audited: also "
                                     "run to the deepest exit", exit_label, registry=r)
        self.audit_agreement = Gauge("byot_edge_audit_agreement", "Share of the last audited "
                                     "early answers that agree with the deepest exit",
                                     exit_label, registry=r)
        self.audit_expected = Gauge("byot_edge_audit_expected_agreement", "That share as "
                                    "calibration measured it (NaN: not recorded)", exit_label,
                                    registry=r)
        self.audit_alarm = Gauge("byot_edge_audit_alarm", "1 while the live agreement is below "
                                 "calibration's beyond both margins (drift)", exit_label,
                                 registry=r)
        self.audit_dropped = Counter("byot_edge_audit_dropped", "Samples dropped from a full "
                                     "audit queue (the audit runs only when the server is "
                                     "idle)", registry=r)
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.ready = Gauge("byot_edge_ready", "1 once the model is warm and answering",
                           registry=r)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds a key each time: once each
            children = self._children[key] = (
                self.requests.labels(endpoint=endpoint, status=str(status)),
                self.request_seconds.labels(endpoint=endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, samples: int, requests: int, seconds: float,
                      exits: Mapping[int, int]) -> None:
        """One model run: its size, time, and how many samples each exit answered."""
        self.batch_size.observe(samples)
        self.batch_requests.observe(requests)
        self.inference_seconds.observe(seconds)
        for k, count in exits.items():
            self.exits.labels(exit=str(k)).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
