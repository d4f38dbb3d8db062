"""The DHT storage backends: one behaviour, checked on MemoryStorage and on RedisStorage
against a real redis-server; then what only Redis promises (restarts, TTLs, atomicity)."""

from __future__ import annotations

import asyncio
import math
import random
import re
import time

import pytest
import redis.asyncio as aioredis
from redis_server import RedisServer, free_port

from apiary.dht.storage import (
    MemoryStorage,
    RedisStorage,
    StorageUnavailable,
    StoredEntry,
    ValueWithExpiration,
)

SHORT = 0.3  # seconds a short-lived record lives
PAST_SHORT = 0.45  # sleep until it has expired


def plain(value: bytes, expiration: float) -> StoredEntry:
    return StoredEntry(value=ValueWithExpiration(value, expiration))


def dictionary(**entries: tuple[bytes, float]) -> StoredEntry:
    return StoredEntry(subkeys={k.encode(): ValueWithExpiration(*v) for k, v in entries.items()})


@pytest.fixture(params=["memory", "redis"])
async def storage(request: pytest.FixtureRequest):
    if request.param == "memory":
        backend = MemoryStorage()
    else:
        backend = await RedisStorage.open(request.getfixturevalue("redis_url"))
    yield backend
    await backend.close()


# ---- the shared behaviour --------------------------------------------------------------


async def test_plain_values_are_stored_and_read_back(storage):
    t = time.time() + 60
    key = bytes(range(20))
    assert await storage.store(key, None, b"\x00value\xff", t)
    assert await storage.get(key) == plain(b"\x00value\xff", t)
    assert await storage.store(b"other", None, b"", t + 0.5)  # empty values are values
    assert await storage.get(b"other") == plain(b"", t + 0.5)
    assert await storage.get(b"never stored") is None


async def test_newer_expiration_wins_older_and_equal_are_refused(storage):
    t = time.time() + 60
    assert await storage.store(b"k", None, b"first", t)
    assert not await storage.store(b"k", None, b"older", t - 1)
    assert not await storage.store(b"k", None, b"equal", t)
    assert await storage.get(b"k") == plain(b"first", t)
    assert await storage.store(b"k", None, b"newer", t + 1e-3)
    assert await storage.get(b"k") == plain(b"newer", t + 1e-3)


async def test_expired_values_disappear(storage):
    start = time.time()
    assert not await storage.store(b"k", None, b"already", start - 1)
    assert not await storage.store(b"k", None, b"nan", math.nan)
    assert await storage.get(b"k") is None
    assert await storage.store(b"k", None, b"short", start + SHORT)
    assert await storage.get(b"k") == plain(b"short", start + SHORT)
    await asyncio.sleep(PAST_SHORT)
    assert await storage.get(b"k") is None
    # what expired blocks nothing, however late it was meant to live relative to the new one
    assert await storage.store(b"k", b"sub", b"next", time.time() + 60)


async def test_subkeys_merge_from_different_writers_and_expire_separately(storage):
    start = time.time()
    assert await storage.store(b"k", b"alice", b"a1", start + SHORT)
    assert await storage.store(b"k", b"bob", b"b1", start + 60)
    assert await storage.get(b"k") == dictionary(alice=(b"a1", start + SHORT), bob=(b"b1", start + 60))
    # each subkey has its own newest-wins rule
    assert not await storage.store(b"k", b"bob", b"b-older", start + 59)
    assert not await storage.store(b"k", b"bob", b"b-equal", start + 60)
    assert await storage.store(b"k", b"bob", b"b2", start + 61)
    assert await storage.store(b"k", b"carol", b"c1", start + 30)  # earlier than bob's: still merges
    await asyncio.sleep(PAST_SHORT)
    assert await storage.get(b"k") == dictionary(bob=(b"b2", start + 61), carol=(b"c1", start + 30))
    assert await storage.store(b"k", b"alice", b"a2", start + 10)  # alice's expired entry blocks nothing
    assert (await storage.get(b"k")).subkeys[b"alice"] == ValueWithExpiration(b"a2", start + 10)


async def test_plain_value_replaces_dictionary_only_after_every_entry(storage):
    t = time.time() + 60
    assert await storage.store(b"k", b"a", b"a", t + 10)
    assert await storage.store(b"k", b"b", b"b", t + 20)
    assert not await storage.store(b"k", None, b"plain", t + 15)  # before b expires
    assert not await storage.store(b"k", None, b"plain", t + 20)  # equal to the latest entry
    assert await storage.get(b"k") == dictionary(a=(b"a", t + 10), b=(b"b", t + 20))
    assert await storage.store(b"k", None, b"plain", t + 21)
    assert await storage.get(b"k") == plain(b"plain", t + 21)  # the whole dictionary is gone


async def test_subkey_replaces_plain_value_only_after_it(storage):
    t = time.time() + 60
    assert await storage.store(b"k", None, b"plain", t)
    assert not await storage.store(b"k", b"a", b"a", t - 5)
    assert not await storage.store(b"k", b"a", b"a", t)
    assert await storage.get(b"k") == plain(b"plain", t)
    assert await storage.store(b"k", b"a", b"a", t + 1)
    assert await storage.get(b"k") == dictionary(a=(b"a", t + 1))  # the plain value is gone
    # a second subkey now merges with the first, not with the old plain value
    assert await storage.store(b"k", b"b", b"b", t - 5)
    assert await storage.get(b"k") == dictionary(a=(b"a", t + 1), b=(b"b", t - 5))


async def test_empty_subkey_is_a_subkey_not_a_plain_value(storage):
    t = time.time() + 60
    assert await storage.store(b"k", b"", b"empty-subkey", t)
    assert await storage.get(b"k") == StoredEntry(subkeys={b"": ValueWithExpiration(b"empty-subkey", t)})


async def test_keys_and_count_ignore_expired(storage):
    start = time.time()
    assert await storage.count() == 0
    for i in range(3):
        assert await storage.store(b"long%d" % i, None, b"v", start + 60)
    assert await storage.store(b"short", None, b"v", start + SHORT)
    assert await storage.store(b"dict-short", b"x", b"v", start + SHORT)
    assert await storage.store(b"dict-mixed", b"x", b"v", start + SHORT)
    assert await storage.store(b"dict-mixed", b"y", b"v", start + 60)
    assert sorted(await storage.keys()) == sorted(
        [b"long0", b"long1", b"long2", b"short", b"dict-short", b"dict-mixed"]
    )
    assert await storage.count() == 6
    await asyncio.sleep(PAST_SHORT)
    assert sorted(await storage.keys()) == [b"dict-mixed", b"long0", b"long1", b"long2"]
    assert await storage.count() == 4


# ---- Redis follows MemoryStorage exactly ---------------------------------------------


async def test_redis_matches_memory_on_random_writes(redis_url):
    """Random writes with few distinct expirations (so ties are common): every answer and
    every read agrees between the reference backend and Redis."""
    rng = random.Random(20240611)
    memory, redis_storage = MemoryStorage(), await RedisStorage.open(redis_url)
    base = time.time() + 600
    try:
        for step in range(400):
            key = rng.choice([b"k0", b"k1", b"k2"])
            subkey = rng.choice([None, None, b"a", b"b", b"c"])
            expiration = base + rng.randint(0, 6) * 0.25
            value = b"%d" % step
            expected = await memory.store(key, subkey, value, expiration)
            assert await redis_storage.store(key, subkey, value, expiration) == expected, step
            assert await redis_storage.get(key) == await memory.get(key), step
        assert sorted(await redis_storage.keys()) == sorted(await memory.keys())
    finally:
        await redis_storage.close()


# ---- what only Redis promises ------------------------------------------------------------


async def test_restarted_node_serves_records_with_their_original_expirations(redis_url):
    expiration = time.time() + 123.456789012345  # not round: every digit must survive
    first = await RedisStorage.open(redis_url)
    assert await first.store(b"plain", None, b"p", expiration)
    assert await first.store(b"dict", b"a", b"a", expiration + 1 / 3)
    assert await first.store(b"dict", b"b", b"b", expiration + 2 / 3)
    await first.close()

    restarted = await RedisStorage.open(redis_url)
    try:
        assert await restarted.get(b"plain") == plain(b"p", expiration)  # exact float equality
        assert await restarted.get(b"dict") == dictionary(
            a=(b"a", expiration + 1 / 3), b=(b"b", expiration + 2 / 3)
        )
        assert sorted(await restarted.keys()) == [b"dict", b"plain"]
        # the merge rules still hold against what was loaded
        assert not await restarted.store(b"plain", None, b"equal", expiration)
    finally:
        await restarted.close()

    elsewhere = await RedisStorage.open(redis_url, namespace="another-node")
    try:
        assert await elsewhere.get(b"plain") is None and await elsewhere.count() == 0
    finally:
        await elsewhere.close()


async def test_records_survive_a_restart_of_redis_itself(redis_server: RedisServer, redis_url):
    expiration = time.time() + 60.123456789
    storage = await RedisStorage.open(redis_url)
    try:
        assert await storage.store(b"k", b"s", b"v", expiration)
        redis_server.restart()  # the same storage reconnects on its next command
        assert await storage.get(b"k") == dictionary(s=(b"v", expiration))
        assert await storage.store(b"k", b"t", b"w", expiration + 1)  # the script is loaded again
        assert await storage.count() == 1
    finally:
        await storage.close()


async def test_redis_key_ttl_follows_the_latest_expiration(redis_url):
    storage = await RedisStorage.open(redis_url, namespace="ttl")
    client = aioredis.Redis.from_url(redis_url)
    try:
        start = time.time()
        name = b"ttl:" + b"k".hex().encode()

        async def ttl_seconds() -> float:
            return await client.pttl(name) / 1000

        assert await storage.store(b"k", None, b"v", start + 30)
        assert await ttl_seconds() == pytest.approx(30, abs=1.0)
        assert await storage.store(b"k", b"a", b"a", start + 40)  # subkey replaces the plain value
        assert await ttl_seconds() == pytest.approx(40, abs=1.0)
        assert await storage.store(b"k", b"b", b"b", start + 35)  # not the latest: TTL unchanged
        assert await ttl_seconds() == pytest.approx(40, abs=1.0)
        assert await storage.store(b"k", b"b", b"b", start + 50)
        assert await ttl_seconds() == pytest.approx(50, abs=1.0)
    finally:
        await client.aclose()
        await storage.close()


async def test_redis_frees_what_has_expired_or_been_replaced(redis_url):
    storage = await RedisStorage.open(redis_url, namespace="free")
    client = aioredis.Redis.from_url(redis_url)

    def name(key: bytes) -> bytes:
        return b"free:" + key.hex().encode()

    try:
        start = time.time()
        assert await storage.store(b"gone", None, b"v", start + SHORT)
        assert await storage.store(b"dict", b"short", b"v", start + SHORT)
        assert await storage.store(b"dict", b"long", b"v", start + 60)
        await asyncio.sleep(PAST_SHORT)
        assert await client.exists(name(b"gone")) == 0  # Redis freed the whole record by its TTL
        assert await storage.store(b"dict", b"new", b"v", start + 30)
        assert await client.hlen(name(b"dict")) == 4  # the expired subkey was pruned on write
        assert await storage.store(b"dict", None, b"plain", start + 61)
        assert await client.hlen(name(b"dict")) == 2  # nothing of the dictionary is left behind
    finally:
        await client.aclose()
        await storage.close()


async def test_expired_records_are_ignored_before_redis_frees_them(redis_url):
    """Reads go by the node's clock, not by whether Redis has evicted the key yet."""
    storage = await RedisStorage.open(redis_url, namespace="late")
    client = aioredis.Redis.from_url(redis_url)
    try:
        start = time.time()
        assert await storage.store(b"plain", None, b"v", start + SHORT)
        assert await storage.store(b"dict", b"a", b"v", start + SHORT)
        for key in (b"plain", b"dict"):
            assert await client.persist(b"late:" + key.hex().encode())  # as if Redis lagged
        await asyncio.sleep(PAST_SHORT)
        assert await storage.get(b"plain") is None and await storage.get(b"dict") is None
        assert await storage.keys() == [] and await storage.count() == 0
        assert await storage.store(b"plain", b"a", b"new", start + 60)  # and they block nothing
        assert await storage.get(b"plain") == dictionary(a=(b"new", start + 60))
    finally:
        await client.aclose()
        await storage.close()


async def test_concurrent_stores_to_one_key_keep_the_latest(redis_url):
    """Many writers (four nodes sharing one Redis, 50 coroutines each) race on one key: the
    read-check-write is atomic, so the latest expiration wins whatever the order."""
    nodes = [await RedisStorage.open(redis_url) for _ in range(4)]
    try:
        base = time.time() + 60
        for round_ in range(3):
            key = b"contended%d" % round_
            expirations = [base + i / 8 for i in range(200)]
            random.Random(round_).shuffle(expirations)

            async def write(i: int, expiration: float) -> bool:
                subkey = None if round_ == 0 else (b"shared" if round_ == 1 else None if i % 2 else b"sub")
                return await nodes[i % 4].store(key, subkey, repr(expiration).encode(), expiration)

            results = await asyncio.gather(*(write(i, e) for i, e in enumerate(expirations)))
            assert any(results)
            entry = await nodes[0].get(key)
            latest = max(expirations)
            assert entry is not None and entry.expiration == latest, round_
            held = [entry.value] if entry.value is not None else list(entry.subkeys.values())
            assert [item.value for item in held] == [repr(latest).encode()], round_

        # concurrent writers of different subkeys all merge in
        subkeys = [b"writer%d" % i for i in range(100)]
        await asyncio.gather(*(nodes[i % 4].store(b"merged", s, s, base) for i, s in enumerate(subkeys)))
        assert sorted((await nodes[1].get(b"merged")).subkeys) == sorted(subkeys)
    finally:
        for node in nodes:
            await node.close()


async def test_unreachable_redis_fails_fast_naming_the_url():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=re.escape(url)):
        await RedisStorage.open(url, timeout=2.0)
    assert time.monotonic() - started < 3.0

    storage = RedisStorage(url)  # without open(): the first command says the same
    try:
        with pytest.raises(StorageUnavailable, match=re.escape(url)):
            await storage.store(b"k", None, b"v", time.time() + 60)
    finally:
        await storage.close()

    secret_url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(StorageUnavailable) as raised:
        await RedisStorage.open(secret_url, timeout=2.0)
    assert "hunter2" not in str(raised.value) and "127.0.0.1" in str(raised.value)


def test_malformed_url_is_refused_naming_it():
    with pytest.raises(ValueError, match="invalid Redis URL 'http://127.0.0.1:6379'"):
        RedisStorage("http://127.0.0.1:6379")
