"""The exceptions of the wire layer.

Client side: every transport or remote failure becomes one of a few `WireError` subclasses that
tell the caller what to do next (try another peer, fix the request, wait). Server side: a
handler raises `InvalidRequest` (or `PayloadTooLarge`) to answer with a clear gRPC status; the
server keeps serving.
"""

from __future__ import annotations

import grpc


class WireError(Exception):
    """A remote call failed. `peer` is the address called, `code` the gRPC status code."""

    def __init__(self, message: str, *, peer: str = "", code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.peer = peer
        self.code = code


class PeerUnavailable(WireError):
    """The peer could not be reached or hung up: try another peer or try later."""


class DeadlineExceeded(WireError, TimeoutError):
    """The call did not finish before its deadline."""


class RequestRejected(WireError):
    """The peer refused the request as malformed, too large or unsupported: fix the request."""


class AccessDenied(WireError):
    """The peer refused the caller's credentials."""


class RemoteFailure(WireError):
    """The peer failed while serving the request: try another peer."""


_CODE_TO_ERROR: dict[grpc.StatusCode, type[WireError]] = {
    grpc.StatusCode.UNAVAILABLE: PeerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INVALID_ARGUMENT: RequestRejected,
    grpc.StatusCode.OUT_OF_RANGE: RequestRejected,
    grpc.StatusCode.FAILED_PRECONDITION: RequestRejected,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RequestRejected,
    grpc.StatusCode.NOT_FOUND: RequestRejected,
    grpc.StatusCode.ALREADY_EXISTS: RequestRejected,
    grpc.StatusCode.UNIMPLEMENTED: RequestRejected,
    grpc.StatusCode.PERMISSION_DENIED: AccessDenied,
    grpc.StatusCode.UNAUTHENTICATED: AccessDenied,
}


def error_from_status(code: grpc.StatusCode, details: str, *, peer: str, method: str) -> WireError:
    """The `WireError` that a failed call to `method` on `peer` with this status maps to."""
    error_type = _CODE_TO_ERROR.get(code, RemoteFailure)
    return error_type(f"{method} on {peer} failed: {code.name}: {details}", peer=peer, code=code)


class InvalidRequest(ValueError):
    """Raised by a handler: the request is malformed. The caller gets INVALID_ARGUMENT."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class PayloadTooLarge(InvalidRequest):
    """Raised by a handler: the request exceeds a size limit. The caller gets RESOURCE_EXHAUSTED."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
