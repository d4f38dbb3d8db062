"""Prometheus registries and metric naming for apiary services.

Each service gets its own :class:`~prometheus_client.CollectorRegistry` rather than the
global default one, so that several services (a whole local swarm) can run in one process
without their metric names colliding. Names follow ``apiary_<service>_<what>_<unit>``; every
registry also carries ``apiary_build_info{version}`` (always 1), the apiary release serving it.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Gauge, PlatformCollector, ProcessCollector

import apiary

__all__ = ["new_registry", "metric_prefix"]

_VALID_PREFIX = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def new_registry() -> CollectorRegistry:
    """Return a fresh registry with the process and platform collectors and ``apiary_build_info``."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Gauge("apiary_build_info", "The apiary release this service runs (always 1)", ["version"],
          registry=registry).labels(apiary.__version__).set(1)
    return registry


def metric_prefix(service: str) -> str:
    """Return the metric name prefix for ``service``: ``"expert-server"`` -> ``"apiary_expert_server"``."""
    prefix = "apiary_" + service.replace("-", "_")
    if not service or not _VALID_PREFIX.match(prefix):
        raise ValueError(
            f"service name {service!r} cannot form a Prometheus metric prefix: "
            "use letters, digits, '-' and '_' only"
        )
    return prefix
