"""Validators: rules a DHT record must pass to be stored, and how writers sign it.

A node calls `validate()` on every record it is asked to store and on every record a lookup
returns (records failing it are dropped); a writer calls `sign_value()` before storing, and a
reader gets the value back through `strip_value()`. Validators compose (`CompositeValidator`)
by `priority`: a validator of higher priority wraps the value *outside* those of lower priority,
so signing applies them lowest priority first, while validating and stripping peel them off
highest priority first. Each validator thus sees, in all three calls, the same value: the
stored value with the wrappers of higher-priority validators removed. (The signature, priority
10, is the outermost wrapper and covers everything inside it; the schema, priority 5, checks the
caller's value.)

Two validators come with the DHT:

- `SignatureValidator`: a key or subkey containing `owner_marker(peer_id)`, i.e.
  ``"[owner:<peer id>]"``, may only be written by that peer; its value carries an Ed25519
  signature over the record (see `SignatureValidator` for the format).
- `SchemaValidator`: keys under a prefix must hold values of the types of a pydantic model's
  fields.

`validate()` never raises, whatever the bytes: malformed records are simply invalid.
`strip_value()` never raises either; it is meant for records that passed `validate()`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import msgpack
import pydantic

from apiary.wire.identity import PEER_ID_LENGTH, Identity, verify_signature


@dataclass(frozen=True)
class DHTRecord:
    """One write: the msgpack-serialized key and subkey (None: no subkey), value bytes, expiration."""

    key: bytes
    subkey: bytes | None
    value: bytes
    expiration: float


class RecordValidator(Protocol):
    """A rule for records. `priority` orders validators in a `CompositeValidator`: the higher it
    is, the further outside its wrapper of the value (applied last by `sign_value`, checked and
    removed first by `validate` and `strip_value`)."""

    priority: int

    def validate(self, record: DHTRecord) -> bool:
        """Whether the record may be stored (or trusted when read)."""
        ...

    def sign_value(self, record: DHTRecord) -> bytes:
        """The value to store in place of `record.value` (e.g. with a signature appended)."""
        ...

    def strip_value(self, record: DHTRecord) -> bytes:
        """The caller's value inside a stored value (e.g. without the signature)."""
        ...


# --------------------------------------------------------------------------------------------
# Ownership and signatures
# --------------------------------------------------------------------------------------------

_OWNER_MARKER_RE = re.compile(rb"\[owner:([a-z2-7]{%d})\]" % PEER_ID_LENGTH)


def owner_marker(peer_id: str) -> str:
    """The marker that, placed anywhere in a key or subkey, reserves it for `peer_id` to write."""
    return f"[owner:{peer_id}]"


def record_owners(record: DHTRecord) -> frozenset[str]:
    """The peer ids whose owner markers appear in the record's (serialized) key or subkey.

    The search runs over the raw msgpack bytes: msgpack embeds str and bytes verbatim, so a
    marker anywhere in a str or bytes key (or inside a list, map, ... of them) is found. A marker
    is ``[owner:`` + 52 characters of the lower-case base32 alphabet + ``]``.
    """
    owners: set[str] = set()
    for part in (record.key, record.subkey):
        if isinstance(part, (bytes, bytearray, memoryview)):
            owners.update(m.group(1).decode("ascii") for m in _OWNER_MARKER_RE.finditer(bytes(part)))
    return frozenset(owners)


_SIGNATURE_OPEN = b"[signature:"
_SIGNATURE_CLOSE = b"]"
_SIGNATURE_BYTES = 64  # Ed25519
_SIGNATURE_B64_LENGTH = 88  # base64 of 64 bytes, with its "==" padding
SIGNATURE_SUFFIX_LENGTH = len(_SIGNATURE_OPEN) + _SIGNATURE_B64_LENGTH + len(_SIGNATURE_CLOSE)  # 100
_SIGNED_DATA_TAG = "apiary.dht.record.v1"


def _signed_data(record: DHTRecord, value: bytes) -> bytes:
    """The bytes an owner signs: a msgpack array (tag, key, subkey, value, expiration).

    The tag keeps these signatures from being valid for anything else; the expiration is packed
    as a float64 whatever its Python type, so 100 and 100.0 sign the same."""
    return msgpack.packb(
        [_SIGNED_DATA_TAG, bytes(record.key), None if record.subkey is None else bytes(record.subkey),
         bytes(value), float(record.expiration)],
        use_bin_type=True,
    )


def _split_signature(stored: bytes) -> tuple[bytes, bytes] | None:
    """(value, signature) if `stored` ends with a well-formed signature suffix, else None."""
    if not isinstance(stored, (bytes, bytearray, memoryview)):
        return None
    stored = bytes(stored)
    if len(stored) < SIGNATURE_SUFFIX_LENGTH:
        return None
    suffix = stored[-SIGNATURE_SUFFIX_LENGTH:]
    if not (suffix.startswith(_SIGNATURE_OPEN) and suffix.endswith(_SIGNATURE_CLOSE)):
        return None
    encoded = suffix[len(_SIGNATURE_OPEN) : -len(_SIGNATURE_CLOSE)]
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(signature) != _SIGNATURE_BYTES or base64.b64encode(signature) != encoded:
        return None  # one spelling per signature: stored values are not malleable
    return stored[:-SIGNATURE_SUFFIX_LENGTH], signature


class SignatureValidator:
    """Records whose key or subkey holds an owner marker must be signed by that owner.

    Signed value format: ``value + b"[signature:" + base64(sig) + b"]"``, a fixed 100-byte
    suffix (11 + 88 + 1) where ``sig`` is the 64-byte Ed25519 signature, by the owner, over
    ``msgpack.packb(["apiary.dht.record.v1", key, subkey, value, float(expiration)])`` (key and
    subkey as the serialized bytes of the record, subkey nil when absent, value the bytes inside
    the suffix). Since msgpack is self-delimiting, a single msgpack object (an unsigned value)
    never has the form "an object followed by this suffix"; and values are only signed and
    unwrapped for owned keys, so ownership, not the bytes, decides whether a suffix is expected.

    Rules: a record with no marker passes unchanged. A record with markers of one owner passes
    only with that owner's valid signature over exactly its key, subkey, value and expiration, so
    forged, tampered, re-dated or moved records fail. A record whose key and subkey name
    *different* owners is refused outright (one signature cannot speak for two peers), and
    `sign_value` refuses to make one.
    """

    priority: int = 10

    def __init__(self, identity: Identity | None = None):
        self.identity = identity
        self.peer_id = identity.peer_id if identity is not None else None

    def sign_value(self, record: DHTRecord) -> bytes:
        """The value to store: signed if the key or subkey names an owner, else unchanged.

        Raises ValueError if the record names an owner other than this identity (or this
        validator has no identity)."""
        owners = record_owners(record)
        if not owners:
            return record.value
        if self.identity is None:
            raise ValueError(
                f"record is owned by {', '.join(sorted(owners))} but this SignatureValidator has no identity to sign with"
            )
        others = sorted(owners - {self.peer_id})
        if others:
            raise ValueError(
                f"peer {self.peer_id} cannot sign a record owned by {', '.join(others)} "
                f"(its key or subkey holds owner_marker({others[0]!r}))"
            )
        signature = self.identity.sign(_signed_data(record, record.value))
        return bytes(record.value) + _SIGNATURE_OPEN + base64.b64encode(signature) + _SIGNATURE_CLOSE

    def validate(self, record: DHTRecord) -> bool:
        try:
            owners = record_owners(record)
            if not owners:
                return True
            if len(owners) > 1:
                return False
            (owner,) = owners
            split = _split_signature(record.value)
            if split is None:
                return False
            value, signature = split
            return verify_signature(owner, signature, _signed_data(record, value))
        except Exception:  # a trust boundary: malformed input is invalid, never an error
            return False

    def strip_value(self, record: DHTRecord) -> bytes:
        """The value without its signature; unchanged for unowned or unsigned records."""
        try:
            if not record_owners(record):
                return record.value
            split = _split_signature(record.value)
        except Exception:
            return record.value
        return record.value if split is None else split[0]


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


def _unpack(data: bytes, **kwargs: Any) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, **kwargs)


class SchemaValidator:
    """Keys under a prefix must hold values of the types declared by a pydantic model.

    A record whose key deserializes to a str ``prefix + NAME`` is valid only if ``NAME`` is a
    field of `schema` and the deserialized value (for a subkey record: the one-item dict
    ``{subkey: value}``) validates against that field's type and constraints (pydantic, lax
    mode; field names, not aliases). Unknown names under the prefix are refused. Any other key
    (another prefix, not a str, not msgpack) passes. Values are stored unchanged.
    """

    priority: int = 5

    def __init__(self, schema: type[pydantic.BaseModel], prefix: str):
        if not (isinstance(schema, type) and issubclass(schema, pydantic.BaseModel)):
            raise TypeError(f"schema must be a pydantic BaseModel subclass, got {schema!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.schema = schema
        self.prefix = prefix
        self._adapters: dict[str, pydantic.TypeAdapter[Any]] = {
            name: pydantic.TypeAdapter(Annotated[field.annotation, field])
            for name, field in schema.model_fields.items()
        }

    def validate(self, record: DHTRecord) -> bool:
        try:
            key = _unpack(record.key)
        except Exception:
            return True  # not a key this schema governs
        if not isinstance(key, str) or not key.startswith(self.prefix):
            return True
        adapter = self._adapters.get(key[len(self.prefix) :])
        if adapter is None:
            return False
        try:
            value = _unpack(record.value)
            if record.subkey is not None:
                value = {_unpack(record.subkey, use_list=False): value}
            adapter.validate_python(value)
        except Exception:  # undecodable, unhashable subkey, wrong type, recursion, ...
            return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


class CompositeValidator:
    """Several validators acting as one (itself a RecordValidator of priority 0).

    Wrappers nest by priority, highest outermost: `sign_value` applies the validators from
    lowest to highest priority, each to the record carrying the value produced so far;
    `strip_value` undoes them from highest to lowest; `validate` checks them from highest to
    lowest, each on the value as it produced it (the stored value with the wrappers of
    higher-priority validators stripped), and fails as soon as one fails. Validators of equal
    priority keep the order they were added in (signing in that order). Nested composites are
    flattened.
    """

    priority: int = 0

    def __init__(self, validators: Iterable[RecordValidator] = ()):
        self._validators: list[RecordValidator] = []  # ascending priority: signing order
        self.extend(validators)

    @property
    def validators(self) -> tuple[RecordValidator, ...]:
        """The validators in signing order (ascending priority)."""
        return tuple(self._validators)

    def extend(self, validators: Iterable[RecordValidator]) -> None:
        for validator in validators:
            if isinstance(validator, CompositeValidator):
                self._validators.extend(validator._validators)
            else:
                self._validators.append(validator)
        self._validators.sort(key=lambda v: v.priority)  # stable

    def sign_value(self, record: DHTRecord) -> bytes:
        value = record.value
        for validator in self._validators:
            value = validator.sign_value(dataclasses.replace(record, value=value))
        return value

    def validate(self, record: DHTRecord) -> bool:
        try:
            for i, validator in enumerate(reversed(self._validators)):
                if not validator.validate(record):
                    return False
                if i < len(self._validators) - 1:
                    record = dataclasses.replace(record, value=validator.strip_value(record))
        except Exception:
            return False
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        for validator in reversed(self._validators):
            record = dataclasses.replace(record, value=validator.strip_value(record))
        return record.value
