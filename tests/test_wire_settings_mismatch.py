"""One set of wire settings for what a process dials and serves; a mismatch is an error naming both sides.

Averagers attached to plaintext servers dial in plaintext by default (they used to dial with
TLS and never form a group), and a peer that sat out rounds names the round it takes. A pool
that disagrees with its server is refused at attach(); a peer that dials a port speaking the
other protocol is told which side speaks what instead of "no answer".
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from averaging_harness import run_swarm
from service_processes import APIARY, ServiceProcesses, free_port

from apiary.averaging.averager import Averager, AveragerSettings
from apiary.dht import DHTNode
from apiary.wire import ChannelPool, Identity, PeerAddress, RpcServer, WireSettings
from apiary.wire.auth import AccessToken
from apiary.wire.client import SettingsMismatch

PAIR = {"target_group_size": 2, "expected_peers": 2, "rounds": 2, "period": 4.0, "plaintext": True}


def test_plaintext_averagers_form_groups_with_their_default_pools_and_a_peer_that_skipped_names_its_round() -> None:
    steady, late = run_swarm([{**PAIR, "seed": 1}, {**PAIR, "seed": 2, "skip_rounds": [0]}])
    assert [r.size for r in steady.rounds] == [None, 2], steady.rounds  # alone in round 0, then together
    assert [(r.round, r.size, r.error) for r in late.rounds] == [(1, 2, None)], late.rounds
    mean = [(a + b) / 2 for a, b in zip(steady.initial, late.initial)]
    for tensors in (steady.final, late.final):
        for got, expected in zip(tensors, mean):
            torch.testing.assert_close(got, expected)


async def test_a_pool_that_disagrees_with_its_server_is_refused_naming_both_sides() -> None:
    identity, authority = Identity.generate(), Identity.generate()
    settings = AveragerSettings(prefix="mismatch")
    plaintext = RpcServer(WireSettings(listen_host="127.0.0.1", tls=False), identity)
    averager = Averager([torch.zeros(3)], None, identity.peer_id, settings, pool=ChannelPool())  # type: ignore[arg-type]
    with pytest.raises(SettingsMismatch, match="the averager dials with TLS but its server serves in plaintext"):
        averager.attach(plaintext)

    node = DHTNode(identity, pool=ChannelPool(WireSettings(tls=False)))
    with pytest.raises(SettingsMismatch, match="the DHT node dials in plaintext but its server serves with TLS"):
        node.attach(RpcServer(WireSettings(listen_host="127.0.0.1", bulk=False), identity))

    token = AccessToken.issue(authority, identity.peer_id, 600).encode()
    private = WireSettings(listen_host="127.0.0.1", run_authority=authority.peer_id, access_token=token)
    averager = Averager([torch.zeros(3)], None, identity.peer_id, settings, pool=ChannelPool())  # type: ignore[arg-type]
    with pytest.raises(SettingsMismatch, match=f"dials in an open run but its server serves in private run {authority.peer_id}"):
        averager.attach(RpcServer(private, identity))

    made = Averager([torch.zeros(3)], None, identity.peer_id, settings)  # type: ignore[arg-type]
    made.attach(plaintext)
    assert made.pool is not None and not made.pool.settings.tls  # by default, made like its server


def test_a_peer_dialing_with_the_other_protocol_is_told_which_side_speaks_what() -> None:
    def join(address: str, *flags: str) -> str:
        done = subprocess.run([*APIARY, "dht", "--host", "127.0.0.1", "--admin-port", str(free_port()),
                               "--bootstrap-timeout", "5", "--initial-peers", address, *flags],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        return " ".join(done.stderr.split())

    with ServiceProcesses() as services:
        tls = services.start("dht", "--new-swarm").wait_until_up()
        plaintext = services.start("dht", "--new-swarm", "--plaintext").wait_until_up()
        tls_peer = PeerAddress.parse(tls.initial_peers)
        error = join(tls.initial_peers, "--plaintext")
        assert f"dials in plaintext but peer {tls_peer.peer_id} at {tls_peer.endpoint} speaks TLS" in error, error
        error = join(plaintext.initial_peers)
        assert "this process dials with TLS but the port speaks plaintext" in error, error
