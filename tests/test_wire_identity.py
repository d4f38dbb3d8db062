"""Peer identity: key files that survive restarts, peer ids, signatures."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from apiary.wire import Identity, IdentityError, peer_id_from_public_key, verify_signature
from apiary.wire.identity import PEER_ID_LENGTH, public_key_from_peer_id

BASE32_LOWER = set("abcdefghijklmnopqrstuvwxyz234567")


def test_save_and_load_keep_the_peer_id(tmp_path: Path) -> None:
    identity = Identity.generate()
    path = tmp_path / "keys" / "peer.pem"  # the parent folder does not exist yet
    identity.save(path)
    loaded = Identity.load(path)
    assert loaded.peer_id == identity.peer_id
    assert loaded.public_key == identity.public_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert not list(tmp_path.glob("keys/*.tmp"))  # the atomic write left nothing behind
    assert Identity.generate().peer_id != identity.peer_id


def test_saving_over_a_world_readable_file_makes_it_private(tmp_path: Path) -> None:
    path = tmp_path / "peer.pem"
    path.write_text("old")
    path.chmod(0o644)
    Identity.generate().save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_peer_id_is_lower_case_base32_of_the_public_key() -> None:
    identity = Identity.generate()
    assert len(identity.public_key) == 32
    assert len(identity.peer_id) == PEER_ID_LENGTH == 52
    assert set(identity.peer_id) <= BASE32_LOWER
    assert peer_id_from_public_key(identity.public_key) == identity.peer_id
    assert public_key_from_peer_id(identity.peer_id) == identity.public_key
    with pytest.raises(IdentityError, match="32 bytes"):
        peer_id_from_public_key(b"\x00" * 31)


def test_load_or_create_creates_a_private_file_that_a_restarted_peer_reuses(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity.pem"
    assert not path.exists()
    created = Identity.load_or_create(path)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).peer_id == created.peer_id  # same process, second call

    # A restarted peer: another interpreter loading the same file.
    restarted = subprocess.run(
        [sys.executable, "-c", "import sys; from apiary.wire import Identity; "
         "print(Identity.load_or_create(sys.argv[1]).peer_id)", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert restarted.stdout.strip() == created.peer_id


def test_signatures_verify_only_for_the_signer_and_the_signed_bytes() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    data = b"expert ffn.3 lives at 10.0.0.7:31337"
    signature = alice.sign(data)
    assert len(signature) == 64
    assert verify_signature(alice.peer_id, signature, data)
    assert not verify_signature(bob.peer_id, signature, data)  # another peer's id
    assert not verify_signature(alice.peer_id, signature, data + b"!")  # altered data
    assert not verify_signature(alice.peer_id, bytes([signature[0] ^ 1]) + signature[1:], data)
    assert not verify_signature(alice.peer_id, signature[:-1], data)  # truncated signature
    assert not verify_signature("not-a-peer-id", signature, data)  # malformed id: False, no exception
    assert verify_signature(bob.peer_id, bob.sign(data), data)


def test_other_spellings_of_a_peer_id_are_refused() -> None:
    """One key, one peer id: otherwise one key could pose as many peers, and comparing ids breaks."""
    identity = Identity.generate()
    peer_id = identity.peer_id
    # The last character carries the key's last bit and four padding bits that must be zero:
    # setting padding bits spells the same key differently, as does upper case.
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    key_bit = alphabet.index(peer_id[-1]) & 0b10000
    aliases = [peer_id[:-1] + alphabet[key_bit | padding] for padding in range(1, 16)]
    aliases.append(peer_id.upper())
    signature = identity.sign(b"data")
    for alias in aliases:
        with pytest.raises(IdentityError, match="not canonical") as raised:
            public_key_from_peer_id(alias)
        assert peer_id in str(raised.value)  # the error shows the canonical spelling
        assert not verify_signature(alias, signature, b"data")
    assert verify_signature(peer_id, signature, b"data")


def test_loading_a_garbage_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_bytes(b"\x00\x01 this is not a key\n")
    with pytest.raises(IdentityError, match="not a PEM private key") as raised:
        Identity.load(path)
    assert str(path) in str(raised.value)
    with pytest.raises(IdentityError) as raised:
        Identity.load_or_create(path)  # an existing but broken file is never silently replaced
    assert str(path) in str(raised.value)
    assert path.read_bytes().startswith(b"\x00\x01")


def test_loading_a_missing_file_or_another_key_type_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(IdentityError, match="does not exist") as raised:
        Identity.load(missing)
    assert str(missing) in str(raised.value)

    rsa_like = tmp_path / "ec.pem"
    rsa_like.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(IdentityError, match="not an Ed25519 key") as raised:
        Identity.load(rsa_like)
    assert str(rsa_like) in str(raised.value)
