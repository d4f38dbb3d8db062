"""Peer identity: an Ed25519 key pair per peer and the peer id derived from its public key.

The peer id is the public key itself in lower-case base32 (52 characters), so anyone holding a
peer id can verify that peer's signatures without a lookup. The private key lives in an
identity file (PKCS#8 PEM, mode 0600) so that a restarted peer keeps its id.
"""

from __future__ import annotations

import base64
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from apiary.files import write_atomically

PUBLIC_KEY_BYTES = 32
PEER_ID_LENGTH = 52


class IdentityError(ValueError):
    """An identity file or peer id is unusable."""


@functools.lru_cache(maxsize=1 << 16)  # ids are converted on every DHT message: base32 was a swarm's CPU hot spot
def peer_id_from_public_key(public_key: bytes) -> str:
    """The peer id of a raw 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return base64.b32encode(public_key).decode("ascii").rstrip("=").lower()


@functools.lru_cache(maxsize=1 << 16)  # a malformed id raises each time (exceptions are not cached)
def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw public key inside a peer id; raises IdentityError for a malformed id."""
    if len(peer_id) != PEER_ID_LENGTH:
        raise IdentityError(f"peer id {peer_id!r} must have {PEER_ID_LENGTH} characters, has {len(peer_id)}")
    try:
        public_key = base64.b32decode(peer_id.upper() + "====")
    except ValueError as e:
        raise IdentityError(f"peer id {peer_id!r} is not base32: {e}") from None
    canonical = peer_id_from_public_key(public_key)  # one spelling per key: lower case, zero pad bits
    if peer_id != canonical:
        raise IdentityError(f"peer id {peer_id!r} is not canonical (this key's peer id is {canonical!r})")
    return public_key


def verify_signature(peer_id: str, signature: bytes, data: bytes) -> bool:
    """Whether `signature` over `data` was made by the private key behind `peer_id`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id)).verify(signature, data)
    except (InvalidSignature, IdentityError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A peer's key pair. Create with `generate()`, `load()` or `load_or_create()`."""

    private_key: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Reads an identity file written by `save()` (or `apiary keygen`)."""
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise IdentityError(f"identity file {path} does not exist (create one with `apiary keygen`)") from None
        except ValueError as e:
            raise IdentityError(f"identity file {path} is not a PEM private key: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"identity file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Loads the identity at `path`, creating and saving a new one if the file is absent."""
        if Path(path).exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the private key atomically, readable by the owner only."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomically(path, lambda f: f.write(pem))  # mode 0600 from the start

    @functools.cached_property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @functools.cached_property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)
