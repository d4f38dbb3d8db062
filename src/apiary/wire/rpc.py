"""Declaring gRPC services from protobuf messages, with no generated stubs.

A `ServiceSpec` names a service and its methods with their request and response message
types. The server (`apiary.wire.server`) and client (`apiary.wire.client`) both work from the
spec, so every service in apiary is served, traced, measured and error-mapped the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message

from apiary.wire.errors import InvalidRequest


class CallContext:
    """What a handler may know about the call it serves."""

    def __init__(self, grpc_context: grpc.aio.ServicerContext):
        self._grpc = grpc_context

    @property
    def peer(self) -> str:
        """The caller's transport address, as gRPC reports it (e.g. `ipv4:1.2.3.4:5678`)."""
        return self._grpc.peer()

    @property
    def metadata(self) -> dict[str, str | bytes]:
        return dict(self._grpc.invocation_metadata() or ())

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline (None: no deadline)."""
        return self._grpc.time_remaining()


@dataclass(frozen=True)
class Method:
    """One RPC: its name (CamelCase), message types and streaming shape."""

    name: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool = False
    server_streaming: bool = False

    @property
    def handler_name(self) -> str:
        """The attribute of a service implementation that serves this method (snake_case)."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()


@dataclass(frozen=True)
class ServiceSpec:
    """A gRPC service: its full name (`package.Service`) and its methods. A `local` service is
    served on a participant's local API port to its own services only: clients call it in
    plaintext and without private-run credentials."""

    name: str
    methods: tuple[Method, ...]
    local: bool = False

    def method(self, name: str) -> Method:
        for method in self.methods:
            if method.name == name:
                return method
        raise KeyError(f"service {self.name} has no method {name!r}")

    def path(self, method: Method) -> str:
        return f"/{self.name}/{method.name}"


def decode(message_type: type[Message], raw: bytes) -> Message:
    """Parses a request, turning a protobuf decode failure into InvalidRequest."""
    try:
        return message_type.FromString(raw)
    except (DecodeError, ValueError, TypeError) as e:
        raise InvalidRequest(f"malformed {message_type.DESCRIPTOR.full_name}: {e}") from None
