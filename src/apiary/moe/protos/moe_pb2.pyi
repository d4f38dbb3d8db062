from apiary.wire.protos import wire_pb2 as _wire_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertRequest(_message.Message):
    __slots__ = ("expert", "tensors", "keep_activations", "handle", "keywords")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    expert: str
    tensors: _containers.RepeatedCompositeFieldContainer[_wire_pb2.TensorChunk]
    keep_activations: bool
    handle: bytes
    keywords: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, expert: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_wire_pb2.TensorChunk, _Mapping]]] = ..., keep_activations: _Optional[bool] = ..., handle: _Optional[bytes] = ..., keywords: _Optional[_Iterable[str]] = ...) -> None: ...

class ExpertResponse(_message.Message):
    __slots__ = ("tensors", "handle")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_wire_pb2.TensorChunk]
    handle: bytes
    def __init__(self, tensors: _Optional[_Iterable[_Union[_wire_pb2.TensorChunk, _Mapping]]] = ..., handle: _Optional[bytes] = ...) -> None: ...

class ExpertCalls(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[ExpertRequest]
    def __init__(self, calls: _Optional[_Iterable[_Union[ExpertRequest, _Mapping]]] = ...) -> None: ...

class ExpertResult(_message.Message):
    __slots__ = ("tensors", "code", "error", "handle", "dtype")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_wire_pb2.TensorChunk]
    code: str
    error: str
    handle: bytes
    dtype: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[_wire_pb2.TensorChunk, _Mapping]]] = ..., code: _Optional[str] = ..., error: _Optional[str] = ..., handle: _Optional[bytes] = ..., dtype: _Optional[str] = ...) -> None: ...

class ExpertResults(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ExpertResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ExpertResult, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("expert",)
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    expert: str
    def __init__(self, expert: _Optional[str] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("name", "kind", "hidden_size", "max_batch_size", "forward_batches", "forward_requests", "backward_batches", "backward_requests", "updates", "dtype", "inputs", "outputs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BATCHES_FIELD_NUMBER: _ClassVar[int]
    FORWARD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    hidden_size: int
    max_batch_size: int
    forward_batches: int
    forward_requests: int
    backward_batches: int
    backward_requests: int
    updates: int
    dtype: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSchema]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSchema]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., hidden_size: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., forward_batches: _Optional[int] = ..., forward_requests: _Optional[int] = ..., backward_batches: _Optional[int] = ..., backward_requests: _Optional[int] = ..., updates: _Optional[int] = ..., dtype: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSchema, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSchema, _Mapping]]] = ...) -> None: ...

class TensorSchema(_message.Message):
    __slots__ = ("name", "dims", "dtype", "optional")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    dims: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    optional: bool
    def __init__(self, name: _Optional[str] = ..., dims: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., optional: _Optional[bool] = ...) -> None: ...
