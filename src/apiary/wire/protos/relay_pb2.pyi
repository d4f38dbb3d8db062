from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CircuitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[CircuitKind]
    GRPC: _ClassVar[CircuitKind]
    BULK: _ClassVar[CircuitKind]
    PUNCH: _ClassVar[CircuitKind]
KIND_UNSPECIFIED: CircuitKind
GRPC: CircuitKind
BULK: CircuitKind
PUNCH: CircuitKind

class Greeting(_message.Message):
    __slots__ = ("relay_peer", "nonce", "observed_address")
    RELAY_PEER_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    relay_peer: str
    nonce: bytes
    observed_address: str
    def __init__(self, relay_peer: _Optional[str] = ..., nonce: _Optional[bytes] = ..., observed_address: _Optional[str] = ...) -> None: ...

class Reserve(_message.Message):
    __slots__ = ("peer_id", "signature", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    signature: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, peer_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Connect(_message.Message):
    __slots__ = ("target_peer", "kind", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TARGET_PEER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    target_peer: str
    kind: CircuitKind
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, target_peer: _Optional[str] = ..., kind: _Optional[_Union[CircuitKind, str]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Accept(_message.Message):
    __slots__ = ("circuit_id", "peer_id", "signature")
    CIRCUIT_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    circuit_id: str
    peer_id: str
    signature: bytes
    def __init__(self, circuit_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Keepalive(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...

class ClientFrame(_message.Message):
    __slots__ = ("reserve", "connect", "accept", "keepalive")
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    reserve: Reserve
    connect: Connect
    accept: Accept
    keepalive: Keepalive
    def __init__(self, reserve: _Optional[_Union[Reserve, _Mapping]] = ..., connect: _Optional[_Union[Connect, _Mapping]] = ..., accept: _Optional[_Union[Accept, _Mapping]] = ..., keepalive: _Optional[_Union[Keepalive, _Mapping]] = ...) -> None: ...

class Reserved(_message.Message):
    __slots__ = ("keepalive_seconds", "idle_timeout", "observed_address")
    KEEPALIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    keepalive_seconds: float
    idle_timeout: float
    observed_address: str
    def __init__(self, keepalive_seconds: _Optional[float] = ..., idle_timeout: _Optional[float] = ..., observed_address: _Optional[str] = ...) -> None: ...

class Incoming(_message.Message):
    __slots__ = ("circuit_id", "kind", "dialer_address", "dialer_peer")
    CIRCUIT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIALER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DIALER_PEER_FIELD_NUMBER: _ClassVar[int]
    circuit_id: str
    kind: CircuitKind
    dialer_address: str
    dialer_peer: str
    def __init__(self, circuit_id: _Optional[str] = ..., kind: _Optional[_Union[CircuitKind, str]] = ..., dialer_address: _Optional[str] = ..., dialer_peer: _Optional[str] = ...) -> None: ...

class Connected(_message.Message):
    __slots__ = ("circuit_id", "peer_address")
    CIRCUIT_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    circuit_id: str
    peer_address: str
    def __init__(self, circuit_id: _Optional[str] = ..., peer_address: _Optional[str] = ...) -> None: ...

class Refused(_message.Message):
    __slots__ = ("reason", "code", "details")
    REASON_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    code: int
    details: str
    def __init__(self, reason: _Optional[str] = ..., code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...

class RelayFrame(_message.Message):
    __slots__ = ("greeting", "reserved", "incoming", "connected", "refused", "keepalive")
    GREETING_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    INCOMING_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    greeting: Greeting
    reserved: Reserved
    incoming: Incoming
    connected: Connected
    refused: Refused
    keepalive: Keepalive
    def __init__(self, greeting: _Optional[_Union[Greeting, _Mapping]] = ..., reserved: _Optional[_Union[Reserved, _Mapping]] = ..., incoming: _Optional[_Union[Incoming, _Mapping]] = ..., connected: _Optional[_Union[Connected, _Mapping]] = ..., refused: _Optional[_Union[Refused, _Mapping]] = ..., keepalive: _Optional[_Union[Keepalive, _Mapping]] = ...) -> None: ...
