from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeInfo(_message.Message):
    __slots__ = ("peer_id", "address")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("sender",)
    SENDER_FIELD_NUMBER: _ClassVar[int]
    sender: NodeInfo
    def __init__(self, sender: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("node", "dht_time", "observed_address")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DHT_TIME_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    dht_time: float
    observed_address: str
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., dht_time: _Optional[float] = ..., observed_address: _Optional[str] = ...) -> None: ...

class StoreItem(_message.Message):
    __slots__ = ("key", "has_subkey", "subkey", "value", "expiration")
    KEY_FIELD_NUMBER: _ClassVar[int]
    HAS_SUBKEY_FIELD_NUMBER: _ClassVar[int]
    SUBKEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    has_subkey: bool
    subkey: bytes
    value: bytes
    expiration: float
    def __init__(self, key: _Optional[bytes] = ..., has_subkey: _Optional[bool] = ..., subkey: _Optional[bytes] = ..., value: _Optional[bytes] = ..., expiration: _Optional[float] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("sender", "items", "cache_for")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FOR_FIELD_NUMBER: _ClassVar[int]
    sender: NodeInfo
    items: _containers.RepeatedCompositeFieldContainer[StoreItem]
    cache_for: float
    def __init__(self, sender: _Optional[_Union[NodeInfo, _Mapping]] = ..., items: _Optional[_Iterable[_Union[StoreItem, _Mapping]]] = ..., cache_for: _Optional[float] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("node", "stored", "observed_address", "refused")
    NODE_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    stored: _containers.RepeatedScalarFieldContainer[bool]
    observed_address: str
    refused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., stored: _Optional[_Iterable[bool]] = ..., observed_address: _Optional[str] = ..., refused: _Optional[_Iterable[str]] = ...) -> None: ...

class SubkeyValue(_message.Message):
    __slots__ = ("subkey", "value", "expiration")
    SUBKEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    subkey: bytes
    value: bytes
    expiration: float
    def __init__(self, subkey: _Optional[bytes] = ..., value: _Optional[bytes] = ..., expiration: _Optional[float] = ...) -> None: ...

class FoundValue(_message.Message):
    __slots__ = ("found", "value", "expiration", "subkeys", "more", "stored", "digest")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    SUBKEYS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: bytes
    expiration: float
    subkeys: _containers.RepeatedCompositeFieldContainer[SubkeyValue]
    more: bool
    stored: bool
    digest: bytes
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[bytes] = ..., expiration: _Optional[float] = ..., subkeys: _Optional[_Iterable[_Union[SubkeyValue, _Mapping]]] = ..., more: _Optional[bool] = ..., stored: _Optional[bool] = ..., digest: _Optional[bytes] = ...) -> None: ...

class FindRequest(_message.Message):
    __slots__ = ("sender", "key_ids", "after", "digests", "value_only")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    VALUE_ONLY_FIELD_NUMBER: _ClassVar[int]
    sender: NodeInfo
    key_ids: _containers.RepeatedScalarFieldContainer[bytes]
    after: _containers.RepeatedScalarFieldContainer[bytes]
    digests: bool
    value_only: bool
    def __init__(self, sender: _Optional[_Union[NodeInfo, _Mapping]] = ..., key_ids: _Optional[_Iterable[bytes]] = ..., after: _Optional[_Iterable[bytes]] = ..., digests: _Optional[bool] = ..., value_only: _Optional[bool] = ...) -> None: ...

class FindResult(_message.Message):
    __slots__ = ("value", "nearest")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NEAREST_FIELD_NUMBER: _ClassVar[int]
    value: FoundValue
    nearest: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, value: _Optional[_Union[FoundValue, _Mapping]] = ..., nearest: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class FindResponse(_message.Message):
    __slots__ = ("node", "results", "observed_address")
    NODE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    results: _containers.RepeatedCompositeFieldContainer[FindResult]
    observed_address: str
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., results: _Optional[_Iterable[_Union[FindResult, _Mapping]]] = ..., observed_address: _Optional[str] = ...) -> None: ...

class LocalGetRequest(_message.Message):
    __slots__ = ("keys", "latest")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    latest: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., latest: _Optional[bool] = ...) -> None: ...

class LocalGetResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[FoundValue]
    def __init__(self, values: _Optional[_Iterable[_Union[FoundValue, _Mapping]]] = ...) -> None: ...

class LocalStoreRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StoreItem]
    def __init__(self, items: _Optional[_Iterable[_Union[StoreItem, _Mapping]]] = ...) -> None: ...

class LocalStoreResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, stored: _Optional[_Iterable[bool]] = ...) -> None: ...

class LocalInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LocalInfoResponse(_message.Message):
    __slots__ = ("peer_id", "address", "client_mode", "routing_table_size")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MODE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_TABLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    client_mode: bool
    routing_table_size: int
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., client_mode: _Optional[bool] = ..., routing_table_size: _Optional[int] = ...) -> None: ...

class LocalContactsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class LocalContactsResponse(_message.Message):
    __slots__ = ("addresses",)
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, addresses: _Optional[_Iterable[str]] = ...) -> None: ...
