"""Telemetry shared by every apiary service: the admin HTTP endpoint, metrics and tracing.

A service builds its own registry with :func:`new_registry`, names its metrics with
:func:`metric_prefix`, serves them (with health, readiness and status) through an
:class:`AdminServer`, and sets up spans with :func:`configure_tracing`.
"""

from apiary.telemetry.admin import AdminServer
from apiary.telemetry.metrics import metric_prefix, new_registry
from apiary.telemetry.tracing import TracingSettings, configure_tracing, shutdown_tracing

__all__ = [
    "AdminServer",
    "TracingSettings",
    "configure_tracing",
    "shutdown_tracing",
    "new_registry",
    "metric_prefix",
]
