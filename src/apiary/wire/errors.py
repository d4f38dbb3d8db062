"""The exceptions of the wire layer, one table between the two sides.

Server side: a handler raises a `RequestError` subclass to answer with the gRPC status that says
what happened (the request is malformed, names what is not here, comes at the wrong time, is over
a limit); any other exception is INTERNAL, logged. The server keeps serving either way.

Client side: every transport or remote failure becomes the `WireError` subclass that `_CODE_TO_ERROR`
maps its status to, which tells the caller what to do next (fix the request, look elsewhere, call
what comes first, try later or send less, try another peer).
"""

from __future__ import annotations

import grpc

# ---------------------------------------------------------------- server side: raised by handlers


class RequestError(Exception):
    """Raised by a handler: the request is refused with status `code` and this message."""

    code: grpc.StatusCode


class InvalidRequest(RequestError):
    """The request is malformed or unsupported: INVALID_ARGUMENT."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundHere(RequestError):
    """What the request names (an expert, a round, a state) is not on this peer: NOT_FOUND."""

    code = grpc.StatusCode.NOT_FOUND


class WrongState(RequestError):
    """The request is valid but this peer's state does not allow it now (nothing registered yet,
    the round is over): FAILED_PRECONDITION."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PayloadTooLarge(RequestError):
    """The request exceeds a size limit: RESOURCE_EXHAUSTED."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Busy(RequestError):
    """This peer is at a limit of its capacity (rate, calls or bytes in flight, queue): RESOURCE_EXHAUSTED."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------- client side: raised to callers


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
    """The peer refused the request as malformed or unsupported: fix the request."""


class NotFound(WireError):
    """What the request names is not on the peer (no such expert or round, no state to give): look elsewhere."""


class PreconditionFailed(WireError):
    """The peer's state does not allow the request now: call what must come first (e.g. Register)."""


class OverLimit(WireError):
    """The peer refused the request for one of its limits (the message names it): too large, so
    send less, or too many at once, so try later or elsewhere."""


class AccessDenied(WireError):
    """The peer refused the caller's credentials (UNAUTHENTICATED) or its right to call (PERMISSION_DENIED)."""


class RemoteFailure(WireError):
    """The peer failed while serving the request: try another peer."""


_CODE_TO_ERROR: dict[grpc.StatusCode, type[WireError]] = {
    grpc.StatusCode.UNAVAILABLE: PeerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INVALID_ARGUMENT: RequestRejected,
    grpc.StatusCode.OUT_OF_RANGE: RequestRejected,
    grpc.StatusCode.ALREADY_EXISTS: RequestRejected,
    grpc.StatusCode.UNIMPLEMENTED: RequestRejected,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverLimit,
    grpc.StatusCode.PERMISSION_DENIED: AccessDenied,
    grpc.StatusCode.UNAUTHENTICATED: AccessDenied,
}


def error_from_status(code: grpc.StatusCode, details: str, *, peer: str, method: str) -> WireError:
    """The `WireError` that a failed call to `method` on `peer` with this status maps to (any
    status not in the table, INTERNAL and UNKNOWN among them: `RemoteFailure`)."""
    error_type = _CODE_TO_ERROR.get(code, RemoteFailure)
    return error_type(f"{method} on {peer} failed: {code.name}: {details}", peer=peer, code=code)
