from apiary.wire.protos import wire_pb2 as _wire_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("tensors", "shm_name")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_wire_pb2.TensorHeader]
    shm_name: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[_wire_pb2.TensorHeader, _Mapping]]] = ..., shm_name: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("schema", "numel", "shared_memory", "matchmaking_seconds")
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    MATCHMAKING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    schema: str
    numel: int
    shared_memory: bool
    matchmaking_seconds: float
    def __init__(self, schema: _Optional[str] = ..., numel: _Optional[int] = ..., shared_memory: _Optional[bool] = ..., matchmaking_seconds: _Optional[float] = ...) -> None: ...

class RoundOutcome(_message.Message):
    __slots__ = ("result", "group_size", "error", "averaged", "formed_early", "sent_bytes", "received_bytes", "members")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    AVERAGED_FIELD_NUMBER: _ClassVar[int]
    FORMED_EARLY_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    result: str
    group_size: int
    error: str
    averaged: bool
    formed_early: bool
    sent_bytes: int
    received_bytes: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, result: _Optional[str] = ..., group_size: _Optional[int] = ..., error: _Optional[str] = ..., averaged: _Optional[bool] = ..., formed_early: _Optional[bool] = ..., sent_bytes: _Optional[int] = ..., received_bytes: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class PrepareReply(_message.Message):
    __slots__ = ("started",)
    STARTED_FIELD_NUMBER: _ClassVar[int]
    started: bool
    def __init__(self, started: _Optional[bool] = ...) -> None: ...

class AverageHeader(_message.Message):
    __slots__ = ("weight", "round")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    weight: float
    round: int
    def __init__(self, weight: _Optional[float] = ..., round: _Optional[int] = ...) -> None: ...

class AverageRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: AverageHeader
    chunk: _wire_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[AverageHeader, _Mapping]] = ..., chunk: _Optional[_Union[_wire_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class AverageReply(_message.Message):
    __slots__ = ("outcome", "chunk")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    outcome: RoundOutcome
    chunk: _wire_pb2.TensorChunk
    def __init__(self, outcome: _Optional[_Union[RoundOutcome, _Mapping]] = ..., chunk: _Optional[_Union[_wire_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class AverageSharedRequest(_message.Message):
    __slots__ = ("weight", "round")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    weight: float
    round: int
    def __init__(self, weight: _Optional[float] = ..., round: _Optional[int] = ...) -> None: ...

class AverageSharedReply(_message.Message):
    __slots__ = ("group_size", "outcome")
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    group_size: int
    outcome: RoundOutcome
    def __init__(self, group_size: _Optional[int] = ..., outcome: _Optional[_Union[RoundOutcome, _Mapping]] = ...) -> None: ...

class PublishStateRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: bytes
    chunk: _wire_pb2.TensorChunk
    def __init__(self, metadata: _Optional[bytes] = ..., chunk: _Optional[_Union[_wire_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class PublishStateReply(_message.Message):
    __slots__ = ("epoch", "tensors", "announced")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    tensors: int
    announced: bool
    def __init__(self, epoch: _Optional[int] = ..., tensors: _Optional[int] = ..., announced: _Optional[bool] = ...) -> None: ...

class LoadStateRequest(_message.Message):
    __slots__ = ("timeout",)
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    timeout: float
    def __init__(self, timeout: _Optional[float] = ...) -> None: ...

class LoadStateReply(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: bytes
    chunk: _wire_pb2.TensorChunk
    def __init__(self, metadata: _Optional[bytes] = ..., chunk: _Optional[_Union[_wire_pb2.TensorChunk, _Mapping]] = ...) -> None: ...
