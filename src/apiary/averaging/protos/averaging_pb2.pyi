from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReduceRequest(_message.Message):
    __slots__ = ("group_id", "sender", "span", "weight", "codec", "numel", "commitment", "signature")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    sender: str
    span: int
    weight: float
    codec: str
    numel: int
    commitment: bytes
    signature: bytes
    def __init__(self, group_id: _Optional[str] = ..., sender: _Optional[str] = ..., span: _Optional[int] = ..., weight: _Optional[float] = ..., codec: _Optional[str] = ..., numel: _Optional[int] = ..., commitment: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ReduceReply(_message.Message):
    __slots__ = ("codec", "numel", "contributors", "total_weight")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    codec: str
    numel: int
    contributors: int
    total_weight: float
    def __init__(self, codec: _Optional[str] = ..., numel: _Optional[int] = ..., contributors: _Optional[int] = ..., total_weight: _Optional[float] = ...) -> None: ...

class MemberInfo(_message.Message):
    __slots__ = ("peer_id", "bulk_address", "mode", "bandwidth")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    BULK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    bulk_address: str
    mode: str
    bandwidth: float
    def __init__(self, peer_id: _Optional[str] = ..., bulk_address: _Optional[str] = ..., mode: _Optional[str] = ..., bandwidth: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("group_key", "member", "schema")
    GROUP_KEY_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    group_key: str
    member: MemberInfo
    schema: str
    def __init__(self, group_key: _Optional[str] = ..., member: _Optional[_Union[MemberInfo, _Mapping]] = ..., schema: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("accepted", "reason", "group_id", "members")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    group_id: str
    members: _containers.RepeatedCompositeFieldContainer[MemberInfo]
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., group_id: _Optional[str] = ..., members: _Optional[_Iterable[_Union[MemberInfo, _Mapping]]] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    def __init__(self, prefix: _Optional[str] = ...) -> None: ...

class StateReply(_message.Message):
    __slots__ = ("metadata", "epoch", "sha256", "packing")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    metadata: bytes
    epoch: int
    sha256: bytes
    packing: _containers.RepeatedCompositeFieldContainer[PackedTensor]
    def __init__(self, metadata: _Optional[bytes] = ..., epoch: _Optional[int] = ..., sha256: _Optional[bytes] = ..., packing: _Optional[_Iterable[_Union[PackedTensor, _Mapping]]] = ...) -> None: ...

class PackedTensor(_message.Message):
    __slots__ = ("codec", "count", "dtype", "shape")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    codec: str
    count: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, codec: _Optional[str] = ..., count: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PartCommitment(_message.Message):
    __slots__ = ("group_id", "span", "sender", "weight", "numel", "root")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    span: int
    sender: str
    weight: float
    numel: int
    root: bytes
    def __init__(self, group_id: _Optional[str] = ..., span: _Optional[int] = ..., sender: _Optional[str] = ..., weight: _Optional[float] = ..., numel: _Optional[int] = ..., root: _Optional[bytes] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("group_id", "span", "blocks")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    span: int
    blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, group_id: _Optional[str] = ..., span: _Optional[int] = ..., blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class AuditedPart(_message.Message):
    __slots__ = ("commitment", "signature", "proofs")
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PROOFS_FIELD_NUMBER: _ClassVar[int]
    commitment: bytes
    signature: bytes
    proofs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, commitment: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., proofs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AuditReply(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[AuditedPart]
    def __init__(self, parts: _Optional[_Iterable[_Union[AuditedPart, _Mapping]]] = ...) -> None: ...

class PartRequest(_message.Message):
    __slots__ = ("group_id", "span")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    span: int
    def __init__(self, group_id: _Optional[str] = ..., span: _Optional[int] = ...) -> None: ...

class PartReply(_message.Message):
    __slots__ = ("weight", "numel")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    weight: float
    numel: int
    def __init__(self, weight: _Optional[float] = ..., numel: _Optional[int] = ...) -> None: ...
