"""Private runs: access tokens from a run authority, and signed calls.

A run authority is an Ed25519 key pair (an `Identity`) held by the run's organiser; its peer id
names the run. The authority issues an `AccessToken` to a peer: its signature over the peer's
id and an expiry time. In a private run (`WireSettings.run_authority`), every call carries the
caller's token and a fresh signature by the caller's identity over the method, the time, a
random nonce, the callee's peer id (the audience) and a digest of the request
(`CallCredentials.metadata`). A server's `Gatekeeper` checks, in order: the token is there, was
signed by the run's authority, has not expired, and is bound to the caller's key; the call's
signature is the caller's; its time is within `CLOCK_SKEW_SECONDS` of the server's clock; it
names an audience and that is this server; its nonce was not seen before. So a captured call
can be replayed neither to its recipient nor to another server. A refusal raises
`AccessRefused` naming its reason and what the caller should do (counted in
`<prefix>_rpc_rejected_total{reason}`).
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from apiary.wire.errors import RequestError
from apiary.wire.identity import (
    PUBLIC_KEY_BYTES,
    Identity,
    IdentityError,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)

TOKEN_PREFIX = "apiary-token-v1."
CLOCK_SKEW_SECONDS = 30.0  # how far a call's time may be from the server's clock
NONCES_KEPT = 100_000  # nonces remembered against replays (older calls are then refused as stale)

# metadata keys of a signed call (gRPC metadata, and the bulk transport's request metadata)
TOKEN_KEY = "apiary-token"
CALLER_KEY = "apiary-caller"
CALL_KEY = "apiary-call"  # "<unix time>/<nonce hex>/<audience peer id or empty>"
SIGNATURE_KEY = "apiary-signature"

# refusal reasons, the `reason` label of the rejected counter
TOKEN_MISSING, TOKEN_INVALID = "token_missing", "token_invalid"
TOKEN_EXPIRED, TOKEN_WRONG_KEY = "token_expired", "token_wrong_key"
BAD_SIGNATURE, STALE, REPLAY, WRONG_AUDIENCE = "bad_signature", "stale", "replay", "wrong_audience"
AUDIENCE_MISSING = "audience_missing"
REASONS = (TOKEN_MISSING, TOKEN_INVALID, TOKEN_EXPIRED, TOKEN_WRONG_KEY, BAD_SIGNATURE, STALE, REPLAY, WRONG_AUDIENCE,
           AUDIENCE_MISSING)
_PERMISSION = {TOKEN_INVALID, TOKEN_EXPIRED, TOKEN_WRONG_KEY, WRONG_AUDIENCE}  # valid caller, no access

_TOKEN_LAYOUT = struct.Struct(f">{PUBLIC_KEY_BYTES}s{PUBLIC_KEY_BYTES}sdd")  # authority, peer, issued, expires
_SIGNATURE_BYTES = 64


class CredentialsError(IdentityError):
    """A token or private-run setting is unusable (a bad config, not a refused call)."""


class AccessRefused(RequestError):
    """A call refused for its credentials; `reason` is one of `REASONS`; UNAUTHENTICATED, or
    PERMISSION_DENIED for a caller whose credentials hold but who may not make this call."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.code = grpc.StatusCode.PERMISSION_DENIED if reason in _PERMISSION else grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class AccessToken:
    """The authority's permission for `peer_id` to take part in its run until `expires_at`."""

    authority: str
    peer_id: str
    issued_at: float
    expires_at: float
    signature: bytes

    @classmethod
    def issue(cls, authority: Identity, peer_id: str, expires_in: float, *, now: float | None = None) -> AccessToken:
        """A token for `peer_id`, valid for `expires_in` seconds from now, signed by `authority`."""
        if expires_in <= 0:
            raise CredentialsError(f"a token must expire in the future (expires_in={expires_in:g} s)")
        issued = time.time() if now is None else now
        unsigned = cls(authority.peer_id, peer_id, issued, issued + expires_in, b"")
        return cls(authority.peer_id, peer_id, issued, issued + expires_in, authority.sign(unsigned._signed_bytes()))

    def _signed_bytes(self) -> bytes:
        return b"apiary-token-v1\0" + _TOKEN_LAYOUT.pack(
            public_key_from_peer_id(self.authority), public_key_from_peer_id(self.peer_id), self.issued_at, self.expires_at
        )

    def encode(self) -> str:
        """The token as one line of text (`apiary-token-v1.<base64url>`)."""
        raw = self._signed_bytes()[len(b"apiary-token-v1\0"):] + self.signature
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str) -> AccessToken:
        """Parses a token's text; CredentialsError if it is not one (its signature is not checked here)."""
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise CredentialsError(f"an access token starts with {TOKEN_PREFIX!r}")
        body = text[len(TOKEN_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError as e:
            raise CredentialsError(f"an access token's body is not base64url: {e}") from None
        if len(raw) != _TOKEN_LAYOUT.size + _SIGNATURE_BYTES:
            raise CredentialsError(f"an access token holds {_TOKEN_LAYOUT.size + _SIGNATURE_BYTES} bytes, "
                                   f"this one {len(raw)}")
        authority, peer, issued, expires = _TOKEN_LAYOUT.unpack(raw[: _TOKEN_LAYOUT.size])
        return cls(peer_id_from_public_key(authority), peer_id_from_public_key(peer), issued, expires,
                   raw[_TOKEN_LAYOUT.size:])

    def signed_by_authority(self) -> bool:
        return verify_signature(self.authority, self.signature, self._signed_bytes())


def read_token(value: str) -> AccessToken:
    """The token in `value`: the token's text itself, or the path of a file holding it."""
    if not value.strip().startswith(TOKEN_PREFIX):
        path = Path(value)
        try:
            value = path.read_text()
        except OSError as e:
            raise CredentialsError(f"access token {value!r} is neither a token ({TOKEN_PREFIX}...) "
                                   f"nor a readable file: {e.strerror}") from None
    return AccessToken.decode(value)


def credentials_advice(run_authority: str) -> str:
    """What a peer must be started with to take part in the private run of `run_authority`."""
    return (f"start this peer with --run-authority {run_authority} and --access-token <token or file> "
            f"(APIARY_RUN_AUTHORITY / APIARY_ACCESS_TOKEN), a token the run's organiser issues for this peer's id "
            f"with `apiary token issue --peer-id <id>` and the key of run authority {run_authority}")


def _signed_call(method: str, moment: str, nonce: str, audience: str, digest: bytes) -> bytes:
    return b"\0".join((b"apiary-call-v1", method.encode(), moment.encode(), nonce.encode(), audience.encode(),
                       digest.hex().encode()))


def request_digest(raw: bytes) -> bytes:
    """The digest of a serialized request that a call's signature covers."""
    return hashlib.sha256(raw).digest()


class CallCredentials:
    """What a caller in a private run attaches to every call: its token and a fresh signature."""

    def __init__(self, identity: Identity, token: AccessToken):
        self.identity = identity
        self.token = token
        self._token_text = token.encode()

    @classmethod
    def for_run(cls, run_authority: str | None, access_token: str | None,
                identity: Identity | None) -> CallCredentials | None:
        """The credentials of a private run's peer (None in an open run); CredentialsError if the
        token is missing, from another authority, or bound to another key than `identity`."""
        if run_authority is None:
            return None
        if access_token is None:
            raise CredentialsError(f"a private run (run authority {run_authority}) needs this peer's access token")
        if identity is None:
            raise CredentialsError("a private run needs this peer's identity to sign its calls")
        token = read_token(access_token)
        if token.authority != run_authority:
            raise CredentialsError(f"the access token was issued by {token.authority}, not by this run's authority "
                                   f"{run_authority}")
        if not token.signed_by_authority():
            raise CredentialsError("the access token's signature is not its authority's")
        if token.peer_id != identity.peer_id:
            raise CredentialsError(f"the access token is for peer {token.peer_id}, but this peer is {identity.peer_id} "
                                   f"(start it with the identity file the token was issued for)")
        if token.expires_at <= time.time():
            raise CredentialsError(f"the access token expired at {time.ctime(token.expires_at)}")
        return cls(identity, token)

    def metadata(self, method: str, *, audience: str | None = None, digest: bytes = b"") -> list[tuple[str, str]]:
        """The metadata of one call to `method` (a gRPC path or `bulk:<route>`) for the peer `audience`
        (servers refuse a call that names none)."""
        moment, nonce = f"{time.time():.6f}", secrets.token_hex(16)
        signature = self.identity.sign(_signed_call(method, moment, nonce, audience or "", digest))
        return [
            (TOKEN_KEY, self._token_text),
            (CALLER_KEY, self.identity.peer_id),
            (CALL_KEY, f"{moment}/{nonce}/{audience or ''}"),
            (SIGNATURE_KEY, base64.b64encode(signature).decode("ascii")),
        ]


class _Nonces:
    """Nonces seen within the clock window, at most `capacity`; when it is full, the oldest is
    forgotten and calls no newer than it are refused as stale, so a replay is never accepted."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()
        self.floor = 0.0  # calls at or before this time cannot be told apart from replays any more

    def add(self, nonce: str, moment: float, now: float) -> bool:
        """Records `nonce`; False if it was seen already."""
        while self._seen and next(iter(self._seen.values())) < now - CLOCK_SKEW_SECONDS * 2:
            self._seen.popitem(last=False)  # older than any acceptable call: cannot come back
        if nonce in self._seen:
            return False
        if len(self._seen) >= self.capacity:
            _, forgotten = self._seen.popitem(last=False)
            self.floor = max(self.floor, forgotten)
        self._seen[nonce] = moment
        return True


class Gatekeeper:
    """A server's check of the credentials of every call in a private run."""

    def __init__(self, run_authority: str, own_peer_id: str, *, count: Callable[[str], None] = lambda reason: None,
                 nonces_kept: int = NONCES_KEPT):
        public_key_from_peer_id(run_authority)  # a malformed authority fails here, not per call
        self.run_authority = run_authority
        self.own_peer_id = own_peer_id
        self._count = count
        self._nonces = _Nonces(nonces_kept)
        self._tokens: OrderedDict[str, AccessToken] = OrderedDict()  # tokens whose signature was checked

    def _refuse(self, reason: str, message: str) -> AccessRefused:
        self._count(reason)
        return AccessRefused(reason, f"access refused ({reason}): {message}")

    def _token(self, text: str) -> AccessToken:
        token = self._tokens.get(text)
        if token is not None:
            self._tokens.move_to_end(text)
            return token
        try:
            token = AccessToken.decode(text)
        except (CredentialsError, IdentityError) as e:
            raise self._refuse(TOKEN_INVALID, f"malformed access token: {e}") from None
        if token.authority != self.run_authority:
            raise self._refuse(TOKEN_INVALID, f"the token was issued by {token.authority}, not by this run's "
                                              f"authority {self.run_authority}")
        if not token.signed_by_authority():
            raise self._refuse(TOKEN_INVALID, "the token's signature is not the run authority's")
        self._tokens[text] = token
        if len(self._tokens) > 4096:
            self._tokens.popitem(last=False)
        return token

    def check(self, metadata: Iterable[tuple[str, str | bytes]], method: str, digest: bytes = b"") -> str:
        """Checks a call to `method`; returns the caller's peer id or raises AccessRefused."""
        fields = {key: value for key, value in metadata if isinstance(value, str)}
        text = fields.get(TOKEN_KEY)
        if not text:
            raise self._refuse(TOKEN_MISSING, f"peer {self.own_peer_id} is in a private run and the call carries no "
                                              f"access token: {credentials_advice(self.run_authority)}")
        token = self._token(text)
        now = time.time()
        if token.expires_at <= now:
            raise self._refuse(TOKEN_EXPIRED, f"the token of peer {token.peer_id} expired at {time.ctime(token.expires_at)} "
                                              f"(ask the organiser of run {self.run_authority} for a new one)")
        caller = fields.get(CALLER_KEY, "")
        if token.peer_id != caller:
            raise self._refuse(TOKEN_WRONG_KEY,
                               f"the token is for peer {token.peer_id}, the call is from {caller or 'nobody'}")
        moment_text, _, rest = fields.get(CALL_KEY, "").partition("/")
        nonce, _, audience = rest.partition("/")
        try:
            signature = base64.b64decode(fields.get(SIGNATURE_KEY, ""), validate=True)
            moment = float(moment_text)
            if not math.isfinite(moment):
                raise ValueError(moment_text)
        except ValueError:
            raise self._refuse(BAD_SIGNATURE, "the call's signature or time is malformed") from None
        if not verify_signature(caller, signature, _signed_call(method, moment_text, nonce, audience, digest)):
            raise self._refuse(BAD_SIGNATURE, f"the call to {method} is not signed by {caller}")
        if abs(moment - now) > CLOCK_SKEW_SECONDS:
            raise self._refuse(STALE, f"the call was signed {now - moment:+.1f} s from this server's clock "
                                      f"(at most ±{CLOCK_SKEW_SECONDS:g} s; check the clocks)")
        if not audience:
            raise self._refuse(AUDIENCE_MISSING, f"the call to {method} names no audience (the callee's peer id): "
                                                 f"it could be replayed to another server")
        if audience and audience != self.own_peer_id:
            raise self._refuse(WRONG_AUDIENCE, f"the call was meant for peer {audience}, this is {self.own_peer_id}")
        if moment <= self._nonces.floor:
            raise self._refuse(STALE, "the call is older than what this server can still check for replays")
        if len(nonce) != 32 or not self._nonces.add(nonce, moment, now):
            raise self._refuse(REPLAY, "this call was already made (a replayed request)")
        return caller


def gatekeeper_for(run_authority: str | None, identity: Identity, count: Callable[[str], None]) -> Gatekeeper | None:
    """A server's gatekeeper in a private run, None in an open run."""
    return Gatekeeper(run_authority, identity.peer_id, count=count) if run_authority else None
