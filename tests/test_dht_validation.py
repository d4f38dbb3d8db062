"""DHT record validators: owner signatures, schemas, and their composition."""

from __future__ import annotations

import base64
import dataclasses
import math

import msgpack
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apiary.dht.validation import (
    SIGNATURE_SUFFIX_LENGTH,
    CompositeValidator,
    DHTRecord,
    RecordValidator,
    SchemaValidator,
    SignatureValidator,
    owner_marker,
    record_owners,
)
from apiary.wire.identity import Identity

EXPIRATION = 1_900_000_000.5


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def record(key, value, subkey=None, expiration=EXPIRATION, *, has_subkey=None) -> DHTRecord:
    """A record as the node builds it: key, subkey and value msgpack-serialized."""
    if has_subkey is None:
        has_subkey = subkey is not None
    return DHTRecord(pack(key), pack(subkey) if has_subkey else None, pack(value), expiration)


def signed(validator, rec: DHTRecord) -> DHTRecord:
    return dataclasses.replace(rec, value=validator.sign_value(rec))


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate()


# ---------------------------------------------------------------------------- owner markers


def test_owner_marker_format(alice):
    assert owner_marker(alice.peer_id) == f"[owner:{alice.peer_id}]"


def test_record_owners_found_in_str_bytes_and_nested_keys(alice, bob):
    marker_a, marker_b = owner_marker(alice.peer_id), owner_marker(bob.peer_id)
    assert record_owners(record("plain", 1)) == frozenset()
    assert record_owners(record(f"x{marker_a}y", 1)) == {alice.peer_id}
    assert record_owners(record(marker_a.encode(), 1)) == {alice.peer_id}
    assert record_owners(record(["k", {"n": marker_a}], 1)) == {alice.peer_id}
    assert record_owners(record("k", 1, subkey=marker_b)) == {bob.peer_id}
    assert record_owners(record(marker_a, 1, subkey=marker_b)) == {alice.peer_id, bob.peer_id}
    # not a peer id: wrong length / alphabet / case
    assert record_owners(record("[owner:abc]", 1)) == frozenset()
    assert record_owners(record(f"[owner:{alice.peer_id.upper()}]", 1)) == frozenset()


# ---------------------------------------------------------------------------- signatures


def test_unowned_records_pass_unchanged(alice):
    validator = SignatureValidator(alice)
    rec = record("public", {"a": 1}, subkey="s")
    assert validator.sign_value(rec) == rec.value
    assert validator.validate(rec)
    assert validator.strip_value(rec) == rec.value
    # a validator without identity signs nothing but still validates
    assert SignatureValidator(None).sign_value(rec) == rec.value


@pytest.mark.parametrize("where", ["key", "subkey", "both"])
def test_sign_validate_strip_round_trip(alice, where):
    marker = owner_marker(alice.peer_id)
    key = f"expert.{marker}" if where in ("key", "both") else "experts"
    subkey = marker if where in ("subkey", "both") else "slot"
    rec = record(key, [1, 2.5, "x"], subkey=subkey)

    signer = SignatureValidator(alice)
    stored = signed(signer, rec)
    assert stored.value != rec.value
    assert stored.value.startswith(rec.value)
    assert len(stored.value) == len(rec.value) + SIGNATURE_SUFFIX_LENGTH
    assert stored.value[-SIGNATURE_SUFFIX_LENGTH:].startswith(b"[signature:")

    reader = SignatureValidator(None)  # anyone can check, no key needed
    assert reader.validate(stored)
    assert reader.strip_value(stored) == rec.value
    assert msgpack.unpackb(reader.strip_value(stored)) == [1, 2.5, "x"]


def test_key_owned_record_without_subkey(alice):
    rec = record(owner_marker(alice.peer_id), "v")
    stored = signed(SignatureValidator(alice), rec)
    assert SignatureValidator().validate(stored)
    assert SignatureValidator().strip_value(stored) == rec.value


def test_unsigned_owned_record_refused(alice):
    rec = record(owner_marker(alice.peer_id), "v")
    assert not SignatureValidator(alice).validate(rec)
    assert not SignatureValidator().validate(record("k", "v", subkey=owner_marker(alice.peer_id)))


def test_signature_by_wrong_signer_refused(alice, bob):
    """Bob takes Alice's key and appends a well-formed signature of his own."""
    rec = record(owner_marker(alice.peer_id), "v")
    forged_signature = bob.sign(b"anything")
    forged = dataclasses.replace(rec, value=rec.value + b"[signature:" + base64.b64encode(forged_signature) + b"]")
    assert not SignatureValidator().validate(forged)
    # and Bob's genuine signature of the same record, made as if the key were his, fails too
    as_bob = signed(SignatureValidator(bob), record(owner_marker(bob.peer_id), "v"))
    moved = dataclasses.replace(rec, value=as_bob.value)
    assert not SignatureValidator().validate(moved)


def test_tampered_value_refused(alice):
    rec = record(owner_marker(alice.peer_id), {"n": 1})
    stored = signed(SignatureValidator(alice), rec)
    signature_suffix = stored.value[-SIGNATURE_SUFFIX_LENGTH:]
    tampered = dataclasses.replace(stored, value=pack({"n": 2}) + signature_suffix)
    assert not SignatureValidator().validate(tampered)
    # a flipped bit in the signature itself
    flipped = bytearray(stored.value)
    flipped[-10] ^= 0x01
    assert not SignatureValidator().validate(dataclasses.replace(stored, value=bytes(flipped)))
    # a truncated signature
    assert not SignatureValidator().validate(dataclasses.replace(stored, value=stored.value[:-1]))


def test_replay_with_other_expiration_refused(alice):
    stored = signed(SignatureValidator(alice), record(owner_marker(alice.peer_id), "v"))
    assert SignatureValidator().validate(stored)
    assert not SignatureValidator().validate(dataclasses.replace(stored, expiration=EXPIRATION + 3600))
    assert not SignatureValidator().validate(dataclasses.replace(stored, expiration=math.inf))


def test_expiration_int_and_float_sign_alike(alice):
    rec = record(owner_marker(alice.peer_id), "v", expiration=1_900_000_000)
    stored = signed(SignatureValidator(alice), rec)
    assert SignatureValidator().validate(dataclasses.replace(stored, expiration=1_900_000_000.0))


def test_replay_onto_other_key_or_subkey_refused(alice):
    marker = owner_marker(alice.peer_id)
    stored = signed(SignatureValidator(alice), record(f"a{marker}", "v", subkey="s1"))
    assert SignatureValidator().validate(stored)
    assert not SignatureValidator().validate(dataclasses.replace(stored, key=pack(f"b{marker}")))
    assert not SignatureValidator().validate(dataclasses.replace(stored, subkey=pack("s2")))
    assert not SignatureValidator().validate(dataclasses.replace(stored, subkey=None))

    sub_owned = signed(SignatureValidator(alice), record("peers", "v", subkey=marker))
    assert SignatureValidator().validate(sub_owned)
    assert not SignatureValidator().validate(dataclasses.replace(sub_owned, key=pack("other-peers")))
    # moved from subkey position to key position
    assert not SignatureValidator().validate(dataclasses.replace(sub_owned, key=pack(marker), subkey=None))


def test_signing_for_someone_elses_marker_raises(alice, bob):
    rec = record(owner_marker(bob.peer_id), "v")
    with pytest.raises(ValueError) as excinfo:
        SignatureValidator(alice).sign_value(rec)
    assert alice.peer_id in str(excinfo.value) and bob.peer_id in str(excinfo.value)
    with pytest.raises(ValueError, match=bob.peer_id):
        SignatureValidator(None).sign_value(rec)


def test_two_different_owners_refused(alice, bob):
    rec = record(owner_marker(alice.peer_id), "v", subkey=owner_marker(bob.peer_id))
    with pytest.raises(ValueError, match=bob.peer_id):
        SignatureValidator(alice).sign_value(rec)
    # even the key owner's valid signature over exactly this record (made by hand, in the
    # documented format) does not make it acceptable: the subkey's owner has not agreed
    data = msgpack.packb(["apiary.dht.record.v1", rec.key, rec.subkey, rec.value, float(rec.expiration)])
    for owner in (alice, bob):
        by_owner = rec.value + b"[signature:" + base64.b64encode(owner.sign(data)) + b"]"
        assert not SignatureValidator().validate(dataclasses.replace(rec, value=by_owner))
    # (the same hand-made signature is accepted where alice is the only owner)
    own = record(owner_marker(alice.peer_id), "v", subkey="x")
    data = msgpack.packb(["apiary.dht.record.v1", own.key, own.subkey, own.value, float(own.expiration)])
    own_signed = own.value + b"[signature:" + base64.b64encode(alice.sign(data)) + b"]"
    assert SignatureValidator().validate(dataclasses.replace(own, value=own_signed))
    # the same owner in key and subkey is fine
    same = record(owner_marker(alice.peer_id), "v", subkey=owner_marker(alice.peer_id))
    assert SignatureValidator().validate(signed(SignatureValidator(alice), same))


def test_non_canonical_base64_signature_refused(alice):
    """The last base64 character before '==' carries 4 unused bits; another spelling decodes to the
    same signature but must not be accepted (stored values stay unique per signature)."""
    stored = signed(SignatureValidator(alice), record(owner_marker(alice.peer_id), "v"))
    value = bytearray(stored.value)
    last_char_index = len(value) - 1 - 2 - 1  # before "==]"
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    position = alphabet.index(value[last_char_index])
    value[last_char_index] = alphabet[position ^ 0x01]  # only the unused low bits change
    variant = dataclasses.replace(stored, value=bytes(value))
    assert base64.b64decode(variant.value[-89:-1]) == base64.b64decode(stored.value[-89:-1])
    assert not SignatureValidator().validate(variant)


# ---------------------------------------------------------------------------- schemas


class Schema(pydantic.BaseModel):
    step: int = pydantic.Field(ge=0)
    experts: dict[str, list[float]]
    name: str


@pytest.fixture
def schema_validator() -> SchemaValidator:
    return SchemaValidator(Schema, prefix="run.")


def test_schema_accepts_valid_values(schema_validator):
    assert schema_validator.validate(record("run.step", 3))
    assert schema_validator.validate(record("run.step", 3.0))  # lax mode
    assert schema_validator.validate(record("run.name", "mnist"))
    assert schema_validator.validate(record("run.experts", [0.5, 1], subkey="ffn.0"))


def test_schema_refuses_invalid_types_and_constraints(schema_validator):
    assert not schema_validator.validate(record("run.step", "three"))
    assert not schema_validator.validate(record("run.step", -1))  # Field(ge=0)
    assert not schema_validator.validate(record("run.name", None))
    assert not schema_validator.validate(record("run.experts", ["x"], subkey="ffn.0"))
    assert not schema_validator.validate(record("run.experts", [1.0], subkey=7))  # subkey must be a str


def test_schema_refuses_unknown_names(schema_validator):
    assert not schema_validator.validate(record("run.unknown", 1))
    assert not schema_validator.validate(record("run.", 1))


def test_schema_refuses_non_dict_field_for_subkey_records(schema_validator):
    # step is an int, so a subkey record ({subkey: value}) can never match it
    assert not schema_validator.validate(record("run.step", 3, subkey="s"))
    assert not schema_validator.validate(record("run.name", "x", subkey="s"))


def test_schema_ignores_keys_outside_prefix(schema_validator):
    assert schema_validator.validate(record("other.step", "not an int"))
    assert schema_validator.validate(record(b"run.step", "bytes key is a different key"))
    assert schema_validator.validate(record(["run.step"], "not a str key"))
    assert schema_validator.validate(DHTRecord(b"\xc1garbage", None, b"\xc1", 0.0))


def test_schema_refuses_undecodable_values(schema_validator):
    assert not schema_validator.validate(DHTRecord(pack("run.step"), None, b"\xc1", EXPIRATION))
    assert not schema_validator.validate(DHTRecord(pack("run.step"), None, pack(1) + b"extra", EXPIRATION))
    assert not schema_validator.validate(DHTRecord(pack("run.experts"), b"\xc1", pack([1.0]), EXPIRATION))


def test_schema_values_unchanged(schema_validator):
    rec = record("run.step", 3)
    assert schema_validator.sign_value(rec) == rec.value
    assert schema_validator.strip_value(rec) == rec.value


def test_schema_validator_rejects_bad_arguments():
    with pytest.raises(TypeError):
        SchemaValidator(dict, prefix="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SchemaValidator(Schema, prefix=b"x")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- composite


class Progress(pydantic.BaseModel):
    peers: dict[str, int]


def composite(identity) -> CompositeValidator:
    # added in an order that differs from priority order on purpose
    return CompositeValidator([SchemaValidator(Progress, prefix="progress."), SignatureValidator(identity)])


def test_composite_is_a_record_validator(alice):
    validator: RecordValidator = composite(alice)
    assert all(callable(getattr(validator, name)) for name in ("validate", "sign_value", "strip_value"))
    assert validator.priority == 0
    assert [v.priority for v in validator.validators] == [5, 10]


def test_composite_good_signed_record_passes_and_strips_back(alice):
    validator = composite(alice)
    rec = record("progress.peers", 12, subkey=owner_marker(alice.peer_id))
    stored = signed(validator, rec)
    assert stored.value != rec.value
    assert validator.validate(stored)
    assert composite(None).validate(stored)
    assert validator.strip_value(stored) == rec.value


def test_composite_signed_record_violating_schema_refused(alice):
    validator = composite(alice)
    rec = record("progress.peers", "not an int", subkey=owner_marker(alice.peer_id))
    stored = signed(validator, rec)
    assert SignatureValidator().validate(stored)  # the signature itself is fine
    assert not validator.validate(stored)


def test_composite_unsigned_owned_record_refused(alice):
    rec = record("progress.peers", 12, subkey=owner_marker(alice.peer_id))
    assert SchemaValidator(Progress, prefix="progress.").validate(rec)
    assert not composite(alice).validate(rec)


def test_composite_order_wraps_higher_priority_outside(alice):
    """Signing runs lowest priority first; each validator sees its own layer when validating."""
    seen: list[tuple[str, str, bytes]] = []

    class Tagger:
        def __init__(self, name: str, priority: int):
            self.name, self.priority = name, priority

        def sign_value(self, rec):
            seen.append(("sign", self.name, rec.value))
            return rec.value + self.name.encode()

        def validate(self, rec):
            seen.append(("validate", self.name, rec.value))
            return rec.value.endswith(self.name.encode())

        def strip_value(self, rec):
            assert rec.value.endswith(self.name.encode())
            return rec.value[: -len(self.name)]

    validator = CompositeValidator([Tagger("hi", 9)])
    validator.extend([Tagger("lo", 1), CompositeValidator([Tagger("mid", 5)])])  # nested: flattened
    rec = DHTRecord(pack("k"), None, b"v", EXPIRATION)
    stored = signed(validator, rec)
    assert stored.value == b"vlomidhi"
    assert validator.validate(stored)
    assert validator.strip_value(stored) == b"v"
    assert seen == [
        ("sign", "lo", b"v"),
        ("sign", "mid", b"vlo"),
        ("sign", "hi", b"vlomid"),
        ("validate", "hi", b"vlomidhi"),
        ("validate", "mid", b"vlomid"),
        ("validate", "lo", b"vlo"),
    ]
    assert not validator.validate(dataclasses.replace(stored, value=b"vmidlohi"))


def test_empty_composite_accepts_everything_unchanged():
    validator = CompositeValidator()
    rec = DHTRecord(b"\xc1", b"\xc1", b"\xc1", math.nan)
    assert validator.validate(rec)
    assert validator.sign_value(rec) == rec.value
    assert validator.strip_value(rec) == rec.value


# ---------------------------------------------------------------------------- garbage never raises

_SOME_ID = Identity.generate()
_MARKER = owner_marker(_SOME_ID.peer_id).encode()
_GARBAGE_VALIDATORS = [
    SignatureValidator(_SOME_ID),
    SchemaValidator(Progress, prefix="progress."),
    SchemaValidator(Schema, prefix=""),  # every str key is governed
    CompositeValidator([SignatureValidator(None), SchemaValidator(Schema, prefix="")]),
]

_bytes_maybe_marked = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda a, b: a + _MARKER + b, st.binary(max_size=50), st.binary(max_size=50)),
    st.builds(lambda s: pack(s), st.text(max_size=30)),
    st.builds(lambda a, b: a + b"[signature:" + base64.b64encode(b) + b"]", st.binary(max_size=50), st.binary(min_size=64, max_size=64)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=_bytes_maybe_marked,
    subkey=st.one_of(st.none(), _bytes_maybe_marked),
    value=_bytes_maybe_marked,
    expiration=st.floats(allow_nan=True, allow_infinity=True),
)
def test_validators_never_raise_on_garbage(key, subkey, value, expiration):
    rec = DHTRecord(key, subkey, value, expiration)
    for validator in _GARBAGE_VALIDATORS:
        assert validator.validate(rec) in (True, False)
        assert isinstance(validator.strip_value(rec), bytes)
    # a garbage record naming an owner is never accepted without that owner's signature
    if _MARKER in key or (subkey is not None and _MARKER in subkey):
        assert not SignatureValidator().validate(rec)


def test_validators_never_raise_on_wrong_types():
    well_formed_suffix = b"[signature:" + base64.b64encode(bytes(64)) + b"]"
    records = [
        DHTRecord(None, 5, "str", "soon"),  # type: ignore[arg-type]
        DHTRecord(_MARKER, None, b"v" + well_formed_suffix, "soon"),  # type: ignore[arg-type]
        DHTRecord(_MARKER, None, b"v" + well_formed_suffix, None),  # type: ignore[arg-type]
        DHTRecord(pack("progress.peers"), [1], pack(1), EXPIRATION),  # type: ignore[arg-type]
    ]
    for rec in records:
        for validator in _GARBAGE_VALIDATORS:
            assert validator.validate(rec) is False or validator.validate(rec) is True


def test_deeply_nested_value_does_not_raise():
    deep = b"\x91" * 100_000 + b"\x00"  # a list in a list in ... 100000 levels
    rec = DHTRecord(pack("progress.peers"), None, deep, EXPIRATION)
    for validator in _GARBAGE_VALIDATORS:
        assert validator.validate(rec) in (True, False)
