"""OpenTelemetry tracing setup shared by every apiary service.

OpenTelemetry allows one global tracer provider per process. The first call to
:func:`configure_tracing` installs an SDK provider; later calls (another service started in
the same process) reuse it and only add their exporter if it is not there yet. The resource
therefore keeps the ``service.name`` of the first service configured in the process.
Trace context is propagated with the W3C ``traceparent`` header (OpenTelemetry's default).
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
from typing import Literal

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["TracingSettings", "configure_tracing", "shutdown_tracing"]

logger = logging.getLogger(__name__)


class TracingSettings(BaseModel):
    """Where a service sends its spans."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exporter: Literal["none", "console", "otlp"] = "none"
    """``none`` creates spans (so trace context propagates) but exports nothing."""
    otlp_endpoint: str | None = None
    """OTLP/gRPC collector address, e.g. ``http://otel-collector:4317``; required for ``otlp``."""

    @model_validator(mode="after")
    def _endpoint_for_otlp(self) -> TracingSettings:
        if self.exporter == "otlp" and not self.otlp_endpoint:
            raise ValueError("otlp_endpoint is required when exporter is 'otlp'")
        return self


_lock = threading.Lock()
_installed: TracerProvider | None = None  # the provider this module made global, ever
_provider: TracerProvider | None = None  # the provider configured since the last shutdown
_processors: dict[str, SpanProcessor] = {}  # exporter key -> processor this module added
_atexit_registered = False


def _exporter_key(settings: TracingSettings) -> str | None:
    if settings.exporter == "none":
        return None
    if settings.exporter == "otlp":
        return f"otlp:{settings.otlp_endpoint}"
    return settings.exporter


def _make_exporter(settings: TracingSettings) -> SpanExporter:
    if settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    # Bind the stream now rather than at import time, so redirected stdout is honoured.
    return ConsoleSpanExporter(out=sys.stdout)


def _global_sdk_provider(service: str) -> TracerProvider:
    """Return the global SDK provider, installing a new one if none is set yet."""
    global _installed
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: f"apiary-{service}"}))
    if isinstance(current, trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
        _installed = provider
    else:
        logger.warning(
            "a non-SDK tracer provider (%s) is already global; apiary-%s spans go to a "
            "private provider instead",
            type(current).__name__,
            service,
        )
    return provider


def configure_tracing(service: str, settings: TracingSettings) -> TracerProvider:
    """Install (or reuse) the process's SDK tracer provider and add ``settings``' exporter."""
    global _provider, _atexit_registered
    with _lock:
        provider = _global_sdk_provider(service)
        _provider = provider
        key = _exporter_key(settings)
        if key is not None and key not in _processors:
            processor = BatchSpanProcessor(_make_exporter(settings))
            provider.add_span_processor(processor)
            _processors[key] = processor
        if not _atexit_registered:
            atexit.register(shutdown_tracing)
            _atexit_registered = True
        return provider


def shutdown_tracing() -> None:
    """Flush and shut down what :func:`configure_tracing` set up; safe to call repeatedly."""
    global _provider
    with _lock:
        provider, processors = _provider, list(_processors.values())
        _provider = None
        _processors.clear()
    if provider is None:
        return
    if provider is _installed:
        provider.shutdown()  # shuts down every processor on it, flushing queued spans first
    else:  # someone else's provider: only shut down what we added to it
        for processor in processors:
            processor.shutdown()
