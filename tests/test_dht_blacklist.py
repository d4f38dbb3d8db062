"""The blacklist's backoff: doubling bans, forgiveness on success, bounded memory."""

from __future__ import annotations

import time

from apiary.dht.blacklist import Blacklist


def test_bans_double_with_each_failure_up_to_the_maximum(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    blacklist = Blacklist(base_seconds=5, max_seconds=30)
    expected_bans = [5, 10, 20, 30, 30]
    for ban in expected_bans:
        blacklist.failed("peer")
        now[0] += ban - 0.01
        assert blacklist.banned("peer")
        now[0] += 0.02
        assert not blacklist.banned("peer")


def test_a_success_lifts_the_ban_and_resets_the_backoff(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    blacklist = Blacklist(base_seconds=5, max_seconds=300)
    blacklist.failed("peer")
    blacklist.failed("peer")
    assert blacklist.banned("peer")
    blacklist.succeeded("peer")
    assert not blacklist.banned("peer")
    blacklist.failed("peer")
    now[0] += 5.01
    assert not blacklist.banned("peer")  # back to the base ban


def test_long_gone_peers_are_forgotten(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    blacklist = Blacklist(base_seconds=1, max_seconds=10)
    for index in range(1000):
        blacklist.failed(f"peer-{index}")
    now[0] += 100
    blacklist.failed("newcomer")
    assert len(blacklist._banned_until) == 1 and len(blacklist._failures) == 1
    assert len(blacklist) == 1
