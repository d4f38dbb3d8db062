"""The expert server's Prometheus metrics (`apiary_expert_server_*`).

- `requests_total{kind,method,status}`: requests by expert kind ("unknown" for an expert not
  hosted here), method (forward, backward, info) and status (`ok` or the gRPC code's name,
  lower case); each part of a ForwardMany/BackwardMany call counts as one request;
- `batch_size{method}`: samples per executed batch;
- `queue_seconds{method}`: how long requests waited for their batch to start;
- `compute_seconds{method}`: how long batches took to run;
- `experts`: experts hosted;
- `skipped_updates_total{kind}`: backward passes whose gradients were not finite, so that the
  expert's optimizer did not step (a NaN, an infinity or an overflow that got through).

`recent_seconds(method)` is a request's recent latency on this server (its wait plus its batch's
run, averaged over about the last `RECENT` batches), which the server publishes in its swarm record.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from apiary.moe.experts import Expert

METHODS = ("forward", "backward", "info")
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
RECENT = 20  # batches the recent latency mostly averages over (exponentially weighted)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ExpertServerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter("apiary_expert_server_requests", "Expert requests by expert kind, method and status",
                                ["kind", "method", "status"], registry=registry)
        self.batch_size = Histogram("apiary_expert_server_batch_size", "Samples per executed batch", ["method"],
                                    buckets=SIZE_BUCKETS, registry=registry)
        self.queue_seconds = Histogram("apiary_expert_server_queue_seconds",
                                       "Time a request waited for its batch to start", ["method"],
                                       buckets=SECONDS_BUCKETS, registry=registry)
        self.compute_seconds = Histogram("apiary_expert_server_compute_seconds", "Time a batch took to run",
                                         ["method"], buckets=SECONDS_BUCKETS, registry=registry)
        self.experts = Gauge("apiary_expert_server_experts", "Experts hosted", registry=registry)
        self._recent: dict[str, float] = {}
        for method in ("forward", "backward"):  # every series exists from the start
            for histogram in (self.batch_size, self.queue_seconds, self.compute_seconds):
                histogram.labels(method)

    def hosting(self, kinds: set[str]) -> None:
        """Creates the ok series of every method for the kinds hosted, so they read 0 from the start."""
        for kind in kinds:
            for method in METHODS:
                self.requests.labels(kind, method, "ok")

    def count_skipped_updates(self, experts: Collection[Expert]) -> None:
        """Exports the experts' skipped updates (they count them themselves, in their threads);
        `experts` may be a live view, read at every scrape."""
        self.registry.register(_SkippedUpdates(experts))

    def request(self, kind: str, method: str, status: str) -> None:
        self.requests.labels(kind, method, status).inc()

    def batch(self, method: str, samples: int, waits: list[float], compute_seconds: float) -> None:
        """Observes one executed batch (the runtime's observer)."""
        self.batch_size.labels(method).observe(samples)
        self.compute_seconds.labels(method).observe(compute_seconds)
        histogram = self.queue_seconds.labels(method)
        for wait in waits:
            histogram.observe(wait)
        latency = compute_seconds + (sum(waits) / len(waits) if waits else 0.0)
        before = self._recent.get(method)
        self._recent[method] = latency if before is None else before + (latency - before) / RECENT

    def recent_seconds(self, method: str) -> float | None:
        """A request's recent latency (wait and run) for `method`; None before the first batch."""
        return self._recent.get(method)


class _SkippedUpdates(Collector):
    def __init__(self, experts: Collection[Expert]):
        self.experts = experts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("apiary_expert_server_skipped_updates",
                                     "Backward passes whose gradients were not finite: no optimizer step",
                                     labels=["kind"])
        totals: dict[str, int] = {}
        for expert in list(self.experts):
            totals[expert.spec.kind] = totals.get(expert.spec.kind, 0) + expert.skipped_updates
        for kind, total in sorted(totals.items()):
            family.add_metric([kind], total)
        yield family
