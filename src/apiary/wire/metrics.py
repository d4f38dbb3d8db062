"""Prometheus metrics of the calls a peer serves (gRPC methods and bulk routes alike)."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram


class RpcMetrics:
    """Per-method call counts by status code, call durations, and the bytes of the messages
    received and sent (serialized protobuf, without gRPC's framing)."""

    def __init__(self, registry: CollectorRegistry, prefix: str):
        self.requests = Counter(
            f"{prefix}_rpc_requests", "RPCs served, by method and status code", ["method", "code"], registry=registry
        )
        self.duration = Histogram(
            f"{prefix}_rpc_duration_seconds", "Time to serve an RPC, by method", ["method"], registry=registry
        )
        self.received = Counter(
            f"{prefix}_rpc_received_bytes", "Bytes of the requests served, by method", ["method"], registry=registry
        )
        self.sent = Counter(
            f"{prefix}_rpc_sent_bytes", "Bytes of the responses sent, by method", ["method"], registry=registry
        )

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.duration.labels(method).observe(seconds)
