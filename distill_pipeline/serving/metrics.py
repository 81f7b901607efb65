"""The server's Prometheus metrics, in a registry of its own (one per server, so tests may run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "distill_serve_requests", "HTTP requests answered", ["route", "status", "served_by"], registry=r
        )
        self.latency = Histogram(
            "distill_serve_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.calls = Counter(
            "distill_serve_calls", "Task calls by deployment and call kind", ["deployment", "call_kind"], registry=r
        )
        self.batch_size = Histogram(
            "distill_serve_batch_size", "Texts per student forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "distill_serve_forward_seconds", "Student forward pass time", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.queue_depth = Gauge("distill_serve_queue_depth", "Texts waiting for the student", registry=r)
        self.teacher_in_flight = Gauge("distill_serve_teacher_in_flight", "Teacher calls in flight", registry=r)
        self.teacher_calls = Counter("distill_serve_teacher_calls", "Teacher calls by outcome", ["outcome"], registry=r)
        self.model = Gauge("distill_serve_model", "The student serving (1) by train id", ["train_id"], registry=r)
        self.swaps = Counter("distill_serve_swaps", "Champion loads by outcome", ["outcome"], registry=r)
        self.rejected = Counter(
            "distill_serve_rejected", "Requests refused before any model ran", ["reason"], registry=r
        )
        self.config_reload_errors = Counter(
            "distill_serve_deployment_reload_errors", "Deployment files that did not parse", registry=r
        )
        self.log_queue = Gauge("distill_serve_log_records_queued", "Log records not yet written", registry=r)

    def serving(self, old_train_id: str | None, new_train_id: str) -> None:
        if old_train_id is not None:
            self.model.remove(old_train_id)
        self.model.labels(new_train_id).set(1)
