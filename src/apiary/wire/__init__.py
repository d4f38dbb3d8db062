"""The wire layer: gRPC servers and clients, peer identity, addresses and tensor streams.

Torch-free: `apiary.wire.tensors` (which needs torch) is imported explicitly by those who
send tensors.
"""

import os

# gRPC core logs every GOAWAY of a closing peer at INFO; keep operators' logs to what matters.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from apiary.wire.address import AddressError, Endpoint, PeerAddress, parse_peer_list
from apiary.wire.client import ChannelPool, RpcClient
from apiary.wire.errors import (
    AccessDenied,
    Busy,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    NotFoundHere,
    OverLimit,
    PayloadTooLarge,
    PeerUnavailable,
    PreconditionFailed,
    RemoteFailure,
    RequestError,
    RequestRejected,
    WireError,
    WrongState,
)
from apiary.wire.identity import Identity, IdentityError, peer_id_from_public_key, verify_signature
from apiary.wire.probe import PROBE, ProbeService
from apiary.wire.rpc import Method, ServiceSpec
from apiary.wire.server import CallContext, RpcServer
from apiary.wire.settings import WireSettings

__all__ = [
    "PROBE",
    "AccessDenied",
    "AddressError",
    "Busy",
    "CallContext",
    "ChannelPool",
    "DeadlineExceeded",
    "Endpoint",
    "Identity",
    "IdentityError",
    "InvalidRequest",
    "Method",
    "NotFound",
    "NotFoundHere",
    "OverLimit",
    "PayloadTooLarge",
    "PeerAddress",
    "PeerUnavailable",
    "PreconditionFailed",
    "ProbeService",
    "RemoteFailure",
    "RequestError",
    "RequestRejected",
    "RpcClient",
    "RpcServer",
    "ServiceSpec",
    "WireError",
    "WireSettings",
    "WrongState",
    "parse_peer_list",
    "peer_id_from_public_key",
    "verify_signature",
]
