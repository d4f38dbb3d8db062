"""DHT records in Redis, so that a restarted node serves them again with their expirations.

Layout: each DHT key is one Redis hash named `<namespace>:<key as hex>`. A plain value has
the fields `v` (the value) and `e` (its expiration); a dictionary has, for each subkey,
`s:<subkey>` (the value) and `x:<subkey>` (its expiration). Expirations are stored as the
shortest text that reads back as the same float (Python's `repr`), so they survive a
restart exactly. The hash's Redis TTL is set (PEXPIREAT) to the latest expiration it holds,
so Redis frees a record once all of it has expired; expired subkeys of a live dictionary are
pruned on the next write to that key and are never returned by reads.

Atomicity: `store` runs one Lua script that reads the key, drops its expired parts, applies
the merge rules of `base.accepts` and writes, all inside Redis. A script runs alone on the
server, so concurrent writers (coroutines, processes, several nodes sharing one Redis) can
never interleave between the check and the write, and it costs one round trip with no
retries. A WATCH/MULTI transaction would let the rules be reused from Python as they are,
but under contention every loser must re-read and retry, which needs either unbounded
retries or a write that can fail for no reason of its own. The script mirrors
`base.accepts` and `base.unexpired` line by line; the shared test suite runs both backends
through the same cases and compares them on random write sequences. Reads (`get`, `keys`)
are single commands decoded in Python and filtered with `base.unexpired`.

Time: the node's clock decides what has expired (it is passed to the script), as for
`MemoryStorage`; Redis's own clock only decides when it frees whole records.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from apiary.dht.storage.base import (
    StorageUnavailable,
    StoredEntry,
    ValueWithExpiration,
    now,
    unexpired,
)

DEFAULT_NAMESPACE = "apiary:dht"

# KEYS[1]: the record's hash. ARGV: mode ("v": plain value, "s": subkey), subkey, value,
# expiration (text), the node's current time (text). Returns 1 if the write was accepted.
# Numbers are never turned back into text except the TTL (Lua's tostring keeps only 14 digits).
_STORE_SCRIPT = """
local key = KEYS[1]
local mode, subkey, value, expiration_text = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expiration = tonumber(expiration_text)
local at = tonumber(ARGV[5])
if not (expiration > at) then return 0 end

-- What the key holds now, without its expired parts (base.unexpired).
local plain = false
local latest = nil            -- base.StoredEntry.expiration of what is left, nil if nothing
local existing = nil          -- the expiration of this write's subkey, if it is held
local plain_text = redis.call('HGET', key, 'e')
if plain_text then
  latest = tonumber(plain_text)
  if latest > at then
    plain = true
  else
    redis.call('DEL', key)
    latest = nil
  end
else
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local field = fields[i]
    if string.sub(field, 1, 2) == 'x:' then
      local name = string.sub(field, 3)
      local entry_expiration = tonumber(fields[i + 1])
      if entry_expiration > at then
        if latest == nil or entry_expiration > latest then latest = entry_expiration end
        if mode == 's' and name == subkey then existing = entry_expiration end
      else
        redis.call('HDEL', key, field, 's:' .. name)
      end
    end
  end
end

-- The merge rules (base.accepts).
if latest ~= nil then
  if mode == 'v' or plain then
    if not (expiration > latest) then return 0 end
  elseif existing ~= nil and not (expiration > existing) then
    return 0
  end
end

if mode == 'v' then
  redis.call('DEL', key)
  redis.call('HSET', key, 'v', value, 'e', expiration_text)
  latest = expiration
else
  if plain then
    redis.call('DEL', key)
    latest = nil
  end
  redis.call('HSET', key, 's:' .. subkey, value, 'x:' .. subkey, expiration_text)
  if latest == nil or expiration > latest then latest = expiration end
end
if latest == math.huge then
  redis.call('PERSIST', key)
else
  redis.call('PEXPIREAT', key, string.format('%.0f', math.ceil(latest * 1000)))
end
return 1
"""

_PLAIN_VALUE, _PLAIN_EXPIRATION = b"v", b"e"
_SUBKEY_VALUE, _SUBKEY_EXPIRATION = b"s:", b"x:"
_SCAN_BATCH = 500


class RedisStorage:
    """Records in Redis under one namespace; several nodes may share a Redis if their
    namespaces differ. Prefer `await RedisStorage.open(url)`, which checks the connection."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        timeout: float = 5.0,
        retries: int = 2,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self._shown_url = _without_password(url)
        # Bounded retries on a dropped connection (e.g. Redis restarted), and a deadline on
        # every command, so a dead Redis is reported instead of waited on.
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=retries)
        try:
            self._redis = aioredis.Redis.from_url(
                url,
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                retry=retry,
                decode_responses=False,
            )
        except ValueError as exc:
            raise ValueError(f"invalid Redis URL {self._shown_url!r}: {exc}") from None
        self._prefix = f"{namespace}:".encode()
        self._store_script = self._redis.register_script(_STORE_SCRIPT)
        self._closed = False

    @classmethod
    async def open(
        cls, url: str, *, namespace: str = DEFAULT_NAMESPACE, timeout: float = 5.0
    ) -> RedisStorage:
        """A storage whose Redis answered; raises `StorageUnavailable` naming the URL if not."""
        storage = cls(url, namespace=namespace, timeout=timeout)
        try:
            await storage.ping()
        except BaseException:
            await storage.close()
            raise
        return storage

    async def ping(self) -> None:
        """Raises `StorageUnavailable` unless Redis answers."""
        with self._reaching("PING"):
            await self._redis.ping()

    async def store(self, key: bytes, subkey: bytes | None, value: bytes, expiration: float) -> bool:
        at = now()
        if not expiration > at:  # refused anyway: spare the round trip
            return False
        args = [
            b"v" if subkey is None else b"s",
            b"" if subkey is None else subkey,
            value,
            repr(float(expiration)),
            repr(at),
        ]
        with self._reaching("store"):
            accepted = await self._store_script(keys=[self._name(key)], args=args)
        return bool(accepted)

    async def get(self, key: bytes) -> StoredEntry | None:
        with self._reaching("get"):
            fields = await self._redis.hgetall(self._name(key))
        entry = _decode(fields)
        return None if entry is None else unexpired(entry, now())

    async def keys(self) -> list[bytes]:
        alive: list[bytes] = []
        batch: list[bytes] = []
        with self._reaching("keys"):
            async for name in self._redis.scan_iter(match=self._pattern(), count=_SCAN_BATCH):
                batch.append(name)
                if len(batch) >= _SCAN_BATCH:
                    alive += await self._alive_keys(batch)
                    batch = []
            if batch:
                alive += await self._alive_keys(batch)
        return alive

    async def count(self) -> int:
        return len(await self.keys())

    async def close(self) -> None:
        """Closes the connection pool; the records stay in Redis."""
        if self._closed:
            return
        self._closed = True
        await self._redis.aclose(close_connection_pool=True)

    async def _alive_keys(self, names: list[bytes]) -> list[bytes]:
        at = now()
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            replies = await pipe.execute(raise_on_error=False)
        alive = []
        for name, fields in zip(names, replies):
            key = self._key(name)
            if key is None or not isinstance(fields, dict):
                continue  # not one of ours
            entry = _decode(fields)
            if entry is not None and unexpired(entry, at) is not None:
                alive.append(key)
        return alive

    def _name(self, key: bytes) -> bytes:
        return self._prefix + key.hex().encode()

    def _key(self, name: bytes) -> bytes | None:
        try:
            return bytes.fromhex(name[len(self._prefix) :].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None

    def _pattern(self) -> bytes:
        escaped = bytearray()
        for byte in self._prefix:
            if byte in b"*?[]\\":
                escaped += b"\\"
            escaped.append(byte)
        return bytes(escaped) + b"*"

    @contextlib.contextmanager
    def _reaching(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StorageUnavailable(f"Redis at {self._shown_url} is unavailable ({what}): {exc}") from exc


def _decode(fields: dict[bytes, bytes]) -> StoredEntry | None:
    if not fields:
        return None
    if _PLAIN_EXPIRATION in fields:
        return StoredEntry(
            value=ValueWithExpiration(fields.get(_PLAIN_VALUE, b""), float(fields[_PLAIN_EXPIRATION]))
        )
    subkeys = {}
    for field, text in fields.items():
        if field.startswith(_SUBKEY_EXPIRATION):
            subkey = field[len(_SUBKEY_EXPIRATION) :]
            value = fields.get(_SUBKEY_VALUE + subkey)
            if value is not None:
                subkeys[subkey] = ValueWithExpiration(value, float(text))
    return StoredEntry(subkeys=subkeys) if subkeys else None


def _without_password(url: str) -> str:
    """The URL to show in messages: any password replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        userinfo = f"{parts.username or ''}:***"
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{userinfo}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable Redis URL>"


__all__ = ["DEFAULT_NAMESPACE", "RedisStorage"]
