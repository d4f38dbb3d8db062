"""What a refusal tells the caller: the error a handler raises reaches it, over gRPC and over the
bulk transport, as the error that names what happened (malformed, not here, not now, over a
limit), with the method, the peer and the handler's message.

Plaintext, asked for explicitly: the mapping does not depend on the transport's security.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from apiary.moe.server import UnknownExpert
from apiary.wire import (
    PROBE,
    AccessDenied,
    Busy,
    ChannelPool,
    DeadlineExceeded,
    Endpoint,
    Identity,
    InvalidRequest,
    Method,
    NotFound,
    NotFoundHere,
    OverLimit,
    PayloadTooLarge,
    PeerUnavailable,
    PreconditionFailed,
    RemoteFailure,
    RequestError,
    RequestRejected,
    RpcClient,
    RpcServer,
    ServiceSpec,
    WireError,
    WireSettings,
    WrongState,
)
from apiary.wire.auth import AccessRefused
from apiary.wire.bulk import BulkAnswer, BulkCall, BulkClient
from apiary.wire.errors import error_from_status
from apiary.wire.limits import RATE, LimitExceeded, StreamStalled
from apiary.wire.protos.wire_pb2 import PingReply, PingRequest

CALLER_ERROR: dict[grpc.StatusCode, type[WireError]] = {
    grpc.StatusCode.CANCELLED: RemoteFailure,
    grpc.StatusCode.UNKNOWN: RemoteFailure,
    grpc.StatusCode.INVALID_ARGUMENT: RequestRejected,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: RequestRejected,
    grpc.StatusCode.PERMISSION_DENIED: AccessDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverLimit,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.ABORTED: RemoteFailure,
    grpc.StatusCode.OUT_OF_RANGE: RequestRejected,
    grpc.StatusCode.UNIMPLEMENTED: RequestRejected,
    grpc.StatusCode.INTERNAL: RemoteFailure,
    grpc.StatusCode.UNAVAILABLE: PeerUnavailable,
    grpc.StatusCode.DATA_LOSS: RemoteFailure,
    grpc.StatusCode.UNAUTHENTICATED: AccessDenied,
}

REFUSALS: list[tuple[RequestError, type[WireError]]] = [
    (InvalidRequest("field 'count' must be positive, got -3"), RequestRejected),
    (NotFoundHere("no all-reduce round 'g7' here"), NotFound),
    (UnknownExpert("expert 'ffn.9' is not hosted here (hosted: none)"), NotFound),
    (WrongState("no tensors are registered: call Register first"), PreconditionFailed),
    (PayloadTooLarge("tensor of 9000 bytes exceeds the limit max_tensor_bytes=100"), OverLimit),
    (Busy("the queue of expert 'ffn.0' is full (64 batches): try later"), OverLimit),
    (LimitExceeded(RATE, "more than max_requests_per_second=1 from 127.0.0.1"), OverLimit),
    (StreamStalled("no PingRequest arrived for 5 s"), DeadlineExceeded),
    (AccessRefused("token_missing", "access refused (token_missing): no access token"), AccessDenied),
    (AccessRefused("wrong_audience", "access refused (wrong_audience): meant for another peer"), AccessDenied),
]

REFUSE = ServiceSpec("apiary.test.Refuse", (Method("Refuse", PingRequest, PingReply),))


class Refuser:
    """Implements REFUSE and a bulk route: both raise `refusal`."""

    def __init__(self) -> None:
        self.refusal: Exception = InvalidRequest("nothing chosen")

    async def refuse(self, request: PingRequest, context: object) -> PingReply:
        raise self.refusal

    async def route(self, call: BulkCall) -> BulkAnswer:
        raise self.refusal


@pytest.mark.parametrize("code", [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK])
def test_every_status_code_maps_to_the_error_that_says_what_to_do(code: grpc.StatusCode) -> None:
    error = error_from_status(code, "what the peer said", peer="10.0.0.7:31337", method="apiary.test.Refuse/Refuse")
    assert type(error) is CALLER_ERROR[code]
    assert error.code is code and error.peer == "10.0.0.7:31337"
    assert str(error) == f"apiary.test.Refuse/Refuse on 10.0.0.7:31337 failed: {code.name}: what the peer said"


def test_every_refusal_a_handler_raises_has_its_status_and_no_refusal_is_a_value_error() -> None:
    for refusal, caller_error in REFUSALS:
        assert CALLER_ERROR[refusal.code] is caller_error, refusal
        assert not isinstance(refusal, ValueError), refusal  # a broad `except ValueError` does not swallow it
    assert REFUSALS[-2][0].code is grpc.StatusCode.UNAUTHENTICATED
    assert REFUSALS[-1][0].code is grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
async def refuser() -> AsyncIterator[tuple[Refuser, RpcServer]]:
    refuser = Refuser()
    server = RpcServer(WireSettings(tls=False, listen_host="127.0.0.1", shutdown_grace=0.5), Identity.generate())
    server.add_service(REFUSE, refuser)
    await server.start()
    assert server.bulk is not None
    server.bulk.add_route("test/refuse", refuser.route)
    yield refuser, server
    await server.stop(0)


@pytest.mark.parametrize(("refusal", "caller_error"), REFUSALS, ids=lambda value: type(value).__name__)
async def test_a_refusal_reaches_the_caller_as_what_happened_over_grpc_and_bulk(
    refuser: tuple[Refuser, RpcServer], refusal: RequestError, caller_error: type[WireError]
) -> None:
    servicer, server = refuser
    servicer.refusal = refusal
    assert server.bulk is not None
    async with ChannelPool(WireSettings(tls=False, default_timeout=10)) as pool:
        with pytest.raises(caller_error) as raised:
            await RpcClient(pool, REFUSE, server.local_endpoint).call("Refuse", PingRequest())
        assert raised.value.code is refusal.code
        assert str(raised.value) == (f"apiary.test.Refuse/Refuse on {server.local_endpoint} failed: "
                                     f"{refusal.code.name}: {refusal}")

        bulk = BulkClient(WireSettings(tls=False, default_timeout=10))
        bulk_endpoint = Endpoint("127.0.0.1", server.bulk.port)
        try:
            with pytest.raises(caller_error) as raised:
                await bulk.call(bulk_endpoint, "test/refuse")
        finally:
            await bulk.close()
        assert raised.value.code is refusal.code
        assert str(raised.value) == f"bulk test/refuse on {bulk_endpoint} failed: {refusal.code.name}: {refusal}"

        reply = await RpcClient(pool, PROBE, server.local_endpoint).call("Ping", PingRequest(), timeout=5)
        assert reply.peer_id == server.identity.peer_id  # still serving
