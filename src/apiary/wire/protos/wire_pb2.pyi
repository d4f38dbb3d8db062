from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorHeader(_message.Message):
    __slots__ = ("dtype", "shape", "nbytes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("peer_id", "announced_address", "version", "server_time", "bulk_address", "observed_address")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    BULK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    announced_address: str
    version: str
    server_time: float
    bulk_address: str
    observed_address: str
    def __init__(self, peer_id: _Optional[str] = ..., announced_address: _Optional[str] = ..., version: _Optional[str] = ..., server_time: _Optional[float] = ..., bulk_address: _Optional[str] = ..., observed_address: _Optional[str] = ...) -> None: ...

class DialBackRequest(_message.Message):
    __slots__ = ("nonce", "grpc_port", "bulk_port", "peer_id")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    grpc_port: int
    bulk_port: int
    peer_id: str
    def __init__(self, nonce: _Optional[bytes] = ..., grpc_port: _Optional[int] = ..., bulk_port: _Optional[int] = ..., peer_id: _Optional[str] = ...) -> None: ...

class DialBackReply(_message.Message):
    __slots__ = ("grpc_address", "grpc_reached", "grpc_error", "bulk_address", "bulk_reached", "bulk_error")
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GRPC_REACHED_FIELD_NUMBER: _ClassVar[int]
    GRPC_ERROR_FIELD_NUMBER: _ClassVar[int]
    BULK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BULK_REACHED_FIELD_NUMBER: _ClassVar[int]
    BULK_ERROR_FIELD_NUMBER: _ClassVar[int]
    grpc_address: str
    grpc_reached: bool
    grpc_error: str
    bulk_address: str
    bulk_reached: bool
    bulk_error: str
    def __init__(self, grpc_address: _Optional[str] = ..., grpc_reached: _Optional[bool] = ..., grpc_error: _Optional[str] = ..., bulk_address: _Optional[str] = ..., bulk_reached: _Optional[bool] = ..., bulk_error: _Optional[str] = ...) -> None: ...

class NonceRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    def __init__(self, digest: _Optional[bytes] = ...) -> None: ...

class NonceReply(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    def __init__(self, nonce: _Optional[bytes] = ...) -> None: ...

class TensorDigest(_message.Message):
    __slots__ = ("header", "sha256")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    sha256: bytes
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class SinkRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: bool
    def __init__(self, digest: _Optional[bool] = ...) -> None: ...

class SinkReply(_message.Message):
    __slots__ = ("tensors", "total_bytes")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDigest]
    total_bytes: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorDigest, _Mapping]]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class BulkRequest(_message.Message):
    __slots__ = ("route", "tensors", "body", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    route: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    body: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, route: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., body: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BulkReply(_message.Message):
    __slots__ = ("code", "details", "tensors", "body")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    body: bytes
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., body: _Optional[bytes] = ...) -> None: ...
