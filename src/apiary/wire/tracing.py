"""OpenTelemetry spans around RPCs, with the trace context carried in gRPC metadata."""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import propagate, trace
from opentelemetry.context import Context

tracer = trace.get_tracer("apiary.wire")


def outgoing_metadata(extra: Iterable[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """Metadata for an outgoing call: the current trace context plus `extra`."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return (*carrier.items(), *extra)


def incoming_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The caller's trace context, extracted from a call's invocation metadata."""
    carrier = {key: value for key, value in (metadata or ()) if isinstance(value, str)}
    return propagate.extract(carrier)


def span_attributes(service: str, method: str, peer: str) -> dict[str, str]:
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, "net.peer.name": peer}
