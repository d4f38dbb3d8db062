"""Private runs: a run authority's tokens admit peers; everyone else is refused (real processes).

The organiser creates an authority and issues tokens with `apiary token`; a dht, two averagers
and an expert server run privately with theirs. The test process is a peer too: with a valid
token it is served by all three services; without one, with an expired one, with another
peer's, or replaying a captured request (gRPC and bulk, to its recipient or to another server),
it is refused, and every refusal is counted in `apiary_<service>_rpc_rejected_total{reason}`.
A peer started without a token is told it was refused and what to give.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from service_processes import APIARY, ServiceProcess, ServiceProcesses, free_port

from apiary.averaging.api.client import AveragerClient
from apiary.dht import DHTNode, DHTSettings
from apiary.dht.api import DHTClient
from apiary.dht.node import NODE_SERVICE
from apiary.dht.protos.dht_pb2 import NodeInfo, PingRequest
from apiary.moe.client import RemoteExpert, run_sync
from apiary.moe.mixture import RemoteMixtureOfExperts
from apiary.wire import (AccessDenied, ChannelPool, Endpoint, Identity, PeerAddress, RequestRejected, RpcClient,
                         WireError, WireSettings)
from apiary.wire.auth import AccessRefused, AccessToken, CallCredentials, Gatekeeper, request_digest
from apiary.wire.bulk import BulkClient
from apiary.wire.framing import MAGIC, signed_digest
from apiary.wire.probe import SINK_ROUTE
from apiary.wire.protos.wire_pb2 import BulkReply, BulkRequest, SinkReply, SinkRequest
from apiary.wire.tensors import tensor_payload

ROUND = ("--run-id", "private", "--target-group-size", "2", "--min-group-size", "2", "--expected-peers", "2",
         "--gather-seconds", "1", "--join-seconds", "3", "--round-timeout", "20", "--sender-timeout", "5")
HIDDEN = 8
NAMES = ("dht", "dht2", "averager1", "averager2", "experts", "me", "other")


@dataclass
class Run:
    folder: Path
    authority: str
    ids: dict[str, Identity]
    dht: ServiceProcess
    dht2: ServiceProcess
    averagers: list[ServiceProcess]
    averager_ports: list[tuple[Endpoint, Endpoint]]  # gRPC, bulk
    experts: ServiceProcess
    experts_address: str

    # Plaintext, asked for: a replay needs a request captured on the wire, which TLS (the default,
    # with tokens in test_optim_swarm.py) would not let anyone capture.
    def private(self, name: str) -> tuple[str, ...]:
        return ("--plaintext", "--identity", str(self.folder / f"{name}.key"), "--run-authority", self.authority,
                "--access-token", str(self.folder / f"{name}.token"))

    def settings(self) -> WireSettings:
        return WireSettings(tls=False, run_authority=self.authority, access_token=str(self.folder / "me.token"),
                            default_timeout=10)

    def token(self, name: str) -> AccessToken:
        return AccessToken.decode((self.folder / f"{name}.token").read_text())


def apiary(*args: str) -> str:
    done = subprocess.run([*APIARY, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    folder = tmp_path_factory.mktemp("private")
    authority_key = folder / "authority.key"
    authority = re.search(r"run authority: (\S+)", apiary("token", "authority", "--authority-key", str(authority_key),
                                                            "--create")).group(1)  # type: ignore[union-attr]
    ids = {}
    for name in NAMES:
        ids[name] = Identity.generate()
        ids[name].save(folder / f"{name}.key")
    issuing = [subprocess.Popen([*APIARY, "token", "issue", "--authority-key", str(authority_key), "--peer-id",
                                 ids[name].peer_id, "--expires-in", "3600", "--output", str(folder / f"{name}.token")],
                                stdout=subprocess.DEVNULL) for name in NAMES]
    assert all(process.wait(60) == 0 for process in issuing)

    with ServiceProcesses() as services:
        partial = Run(folder, authority, ids, *([None] * 6))  # type: ignore[arg-type]
        dht = services.start("dht", "--new-swarm", *partial.private("dht")).wait_until_up()
        started = [
            services.start("dht", *partial.private("dht2"), "--initial-peers", dht.initial_peers),
            *(services.start("averager", *ROUND, *partial.private(f"averager{i}"), "--initial-peers", dht.initial_peers)
              for i in (1, 2)),
            services.start("expert-server", "--experts", "ffn.0.[0:2]", "--hidden-size", str(HIDDEN),
                           "--declare-period", "1", *partial.private("experts"), "--initial-peers", dht.initial_peers),
        ]
        dht2 = started[0].wait_until_up()
        averagers, ports = [], []
        for averager in started[1:3]:
            match = averager.wait_for_line(r"public: (\S+) \(bulk (\S+)\)")
            ports.append((Endpoint.parse(match.group(1)), Endpoint.parse(match.group(2))))
            averagers.append(averager.wait_until_up())
        experts_address = started[3].wait_for_line(r"experts served at: (\S+)").group(1)
        yield Run(folder, authority, ids, dht, dht2, averagers, ports, started[3], experts_address)


def rejected(service: ServiceProcess, prefix: str) -> dict[str, float]:
    return {s.labels["reason"]: s.value
            for family in text_string_to_metric_families(service.get("/metrics").text)
            for s in family.samples if s.name == f"{prefix}_rpc_rejected_total"}


def with_credentials(run: Run, credentials: CallCredentials | None) -> ChannelPool:
    """A client pool whose calls carry `credentials` as they are, valid or not (as a misbehaving peer's would)."""
    pool = ChannelPool(WireSettings(tls=False, default_timeout=10))
    pool.credentials = credentials
    return pool


async def dht_ping(pool: ChannelPool, run: Run) -> str:
    address = PeerAddress.parse(run.dht.initial_peers)
    client = RpcClient(pool, NODE_SERVICE, address.endpoint, peer_id=address.peer_id)
    return (await client.call("Ping", PingRequest(sender=NodeInfo(peer_id=run.ids["me"].peer_id)))).node.peer_id


async def test_the_dht_serves_a_token_holder_and_refuses_everyone_else(run: Run) -> None:
    me, other = run.ids["me"], run.ids["other"]
    dht_id = run.ids["dht"].peer_id
    before = rejected(run.dht, "apiary_dht")
    async with ChannelPool(run.settings(), identity=me) as pool:
        assert await dht_ping(pool, run) == dht_id

    refusals = {
        "token_missing": None,
        "token_expired": CallCredentials(me, AccessToken.issue(Identity.load(run.folder / "authority.key"), me.peer_id,
                                                               60, now=time.time() - 120)),
        "token_wrong_key": CallCredentials(other, run.token("me")),  # my token, another peer's key
        "token_invalid": CallCredentials(me, AccessToken.issue(Identity.generate(), me.peer_id, 60)),  # another authority
    }
    for reason, credentials in refusals.items():
        async with with_credentials(run, credentials) as pool:
            with pytest.raises(AccessDenied, match=rf"access refused \({reason}\)"):
                await dht_ping(pool, run)

    # a captured request, replayed byte for byte, and its signature reused on another request
    credentials = CallCredentials(me, run.token("me"))
    raw = PingRequest(sender=NodeInfo(peer_id=me.peer_id)).SerializeToString()
    metadata = credentials.metadata("/apiary.dht.Node/Ping", audience=dht_id, digest=request_digest(raw))
    async with grpc.aio.insecure_channel(str(PeerAddress.parse(run.dht.initial_peers).endpoint)) as channel:
        call = channel.unary_unary("/apiary.dht.Node/Ping")
        await call(raw, metadata=metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError, match=r"access refused \(replay\)") as replayed:
            await call(raw, metadata=metadata, timeout=10)
        assert replayed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        tampered = PingRequest(sender=NodeInfo(peer_id=other.peer_id)).SerializeToString()
        with pytest.raises(grpc.aio.AioRpcError, match=r"access refused \(bad_signature\)"):
            await call(tampered, metadata=metadata, timeout=10)

        # a call meant for another peer (as a relayed one would be)
        async with ChannelPool(run.settings(), identity=me) as pool:
            client = RpcClient(pool, NODE_SERVICE, PeerAddress.parse(run.dht.initial_peers).endpoint,
                               peer_id=other.peer_id)
            with pytest.raises(AccessDenied, match=r"access refused \(wrong_audience\)"):
                await client.call("Ping", PingRequest(sender=NodeInfo(peer_id=me.peer_id)))

    after = rejected(run.dht, "apiary_dht")
    for reason in (*refusals, "replay", "bad_signature", "wrong_audience"):
        assert after[reason] == before.get(reason, 0) + 1, (reason, after)
    assert run.dht.status()["joined"]  # and it keeps serving


def test_dht_nodes_with_tokens_join_and_one_without_is_refused(run: Run) -> None:
    assert run.ids["dht2"].peer_id in {n["peer_id"] for n in run.dht.status()["neighbours"]}
    before = rejected(run.dht, "apiary_dht").get("token_missing", 0)
    outsider = subprocess.run([*APIARY, "dht", "--plaintext", "--host", "127.0.0.1", "--admin-port", str(free_port()),
                               "--bootstrap-timeout", "5", "--initial-peers", run.dht.initial_peers],
                              capture_output=True, text=True, timeout=60)
    # it is told that the peers answered and refused it, and what to start it with
    assert outsider.returncode == 1, outsider.stderr
    error = " ".join(outsider.stderr.split())
    assert "refused this node's credentials" in error and "access refused (token_missing)" in error, error
    assert f"--run-authority {run.authority} and --access-token" in error and "APIARY_ACCESS_TOKEN" in error, error
    assert "apiary token issue" in error and "none of the initial peers answered" not in error, error
    assert rejected(run.dht, "apiary_dht")["token_missing"] > before


async def test_private_averagers_average_together_and_refuse_outsiders(run: Run) -> None:
    clients = [AveragerClient(a.local_api, timeout=10, round_timeout=60) for a in run.averagers]
    try:
        inputs = [[torch.full((100,), float(i)), torch.arange(7.0) * i] for i in (1, 3)]
        for client, tensors in zip(clients, inputs):
            await client.register(tensors)
        sizes = await asyncio.wait_for(asyncio.gather(*(c.average(t) for c, t in zip(clients, inputs))), 90)
        assert sizes == [2, 2], [c.last_outcome for c in clients]  # Join (gRPC) and the all-reduce (bulk) got through
        assert torch.equal(inputs[0][0], torch.full((100,), 2.0)) and torch.equal(inputs[1][1], torch.arange(7.0) * 2)
    finally:
        for client in clients:
            await client.close()

    grpc_endpoint, bulk_endpoint = run.averager_ports[0]
    averager_id = run.ids["averager1"].peer_id
    before = rejected(run.averagers[0], "apiary_averager")
    async with with_credentials(run, None) as pool:
        with pytest.raises(AccessDenied, match=r"token_missing"):
            await RpcClient(pool, NODE_SERVICE, grpc_endpoint).call("Ping", PingRequest())
    for name, expected in (("other", "token_wrong_key"), (None, "token_missing")):
        client = BulkClient(WireSettings(tls=False, default_timeout=10))
        client.credentials = CallCredentials(run.ids["me"], run.token(name)) if name else None
        try:
            with pytest.raises(AccessDenied, match=expected):
                await client.call(bulk_endpoint, SINK_ROUTE, tensors=[tensor_payload(torch.zeros(1000))])
        finally:
            await client.close()
    client = BulkClient(run.settings(), identity=run.ids["me"])
    try:
        body, _ = await client.call(bulk_endpoint, SINK_ROUTE, tensors=[tensor_payload(torch.zeros(1000))],
                                    body=SinkRequest(digest=True).SerializeToString(), peer_id=averager_id)
        assert SinkReply.FromString(body).total_bytes == 4000
    finally:
        await client.close()

    request = BulkRequest(route=SINK_ROUTE, body=SinkRequest().SerializeToString())
    request.metadata.update(CallCredentials(run.ids["me"], run.token("me")).metadata(
        f"bulk:{SINK_ROUTE}", audience=averager_id, digest=signed_digest(request)))
    frame = request.SerializeToString()
    assert bulk_exchange(bulk_endpoint, frame).code == 0  # the original
    replayed = bulk_exchange(bulk_endpoint, frame)  # captured and sent again, on a new connection
    assert replayed.code == grpc.StatusCode.UNAUTHENTICATED.value[0] and "replay" in replayed.details

    after = rejected(run.averagers[0], "apiary_averager")
    for reason, times in (("token_missing", 2), ("token_wrong_key", 1), ("replay", 1)):
        assert after[reason] == before.get(reason, 0) + times, (reason, after)


def bulk_exchange(endpoint: Endpoint, frame: bytes) -> BulkReply:
    """One bulk request frame (no tensors) sent as raw bytes on a new connection; the reply frame."""
    with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as sock:
        sock.sendall(MAGIC + len(frame).to_bytes(4, "big") + frame)
        size = int.from_bytes(receive(sock, 4), "big")
        return BulkReply.FromString(receive(sock, size))


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def test_the_expert_server_serves_a_token_holder_only(run: Run) -> None:
    x = torch.randn(3, HIDDEN, requires_grad=True)
    admitted = RemoteExpert(run.experts_address, "ffn.0.1", ChannelPool(run.settings(), identity=run.ids["me"]),
                            timeout=10)
    admitted(x).sum().backward()  # Forward and Backward, signed
    assert x.grad is not None and x.grad.shape == x.shape
    before = rejected(run.experts, "apiary_expert_server").get("token_missing", 0)
    with pytest.raises(AccessDenied, match="token_missing"), torch.no_grad():
        RemoteExpert(run.experts_address, "ffn.0.1", ChannelPool(WireSettings(tls=False)), timeout=10)(x)
    assert rejected(run.experts, "apiary_expert_server")["token_missing"] == before + 1
    assert run.experts.status()["updates"] >= 1


def test_a_full_nonce_cache_refuses_old_calls_rather_than_forget_a_replay() -> None:
    authority, me, server = Identity.generate(), Identity.generate(), Identity.generate()
    credentials = CallCredentials(me, AccessToken.issue(authority, me.peer_id, 60))
    gate = Gatekeeper(authority.peer_id, server.peer_id, nonces_kept=2)
    calls = [credentials.metadata("/x/Y", audience=server.peer_id) for _ in range(3)]
    for call in calls:
        assert gate.check(call, "/x/Y") == me.peer_id
    with pytest.raises(AccessRefused, match=r"\(stale\)"):  # its nonce was forgotten: refused all the same
        gate.check(calls[0], "/x/Y")
    with pytest.raises(AccessRefused, match=r"\(replay\)"):  # still remembered
        gate.check(calls[2], "/x/Y")
    assert gate.check(credentials.metadata("/x/Y", audience=server.peer_id), "/x/Y") == me.peer_id  # new calls pass


@pytest.mark.parametrize("problem", ["another peer's token", "no identity file"])
def test_a_peer_with_unusable_credentials_stops_at_start_with_one_line(run: Run, problem: str) -> None:
    args = ["--run-authority", run.authority, "--access-token", str(run.folder / "dht2.token")]
    if problem == "another peer's token":
        args += ["--identity", str(run.folder / "other.key")]
    done = subprocess.run([*APIARY, "dht", "--new-swarm", "--host", "127.0.0.1", "--admin-port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    line, = done.stderr.strip().splitlines()
    assert line.startswith("apiary: error: the access token is for peer " + run.ids["dht2"].peer_id)


class _Recorder(grpc.GenericRpcHandler):
    """A member of the run that records every call it is sent (and answers none)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, list[tuple[str, str]]]] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        async def record(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.calls.append((details.method, raw, [(k, v) for k, v in context.invocation_metadata() or ()]))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "recorded")
            return b""

        return grpc.unary_unary_rpc_method_handler(record)


async def replay(address: str, method: str, raw: bytes, metadata: list[tuple[str, str]]) -> str:
    """Sends a captured call as it is to the server at `address`; its refusal, or "accepted"."""
    async with grpc.aio.insecure_channel(str(PeerAddress.parse(address).endpoint)) as channel:
        try:
            await channel.unary_unary(method)(raw, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.details() or ""
    return "accepted"


async def test_a_call_captured_by_its_recipient_cannot_be_replayed_to_another_server(run: Run) -> None:
    recorder = _Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((recorder,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    me, member = run.ids["me"], run.ids["other"]  # `member` holds a token of the run and records its calls
    ping = PingRequest(sender=NodeInfo(peer_id=me.peer_id))
    try:
        async with ChannelPool(run.settings(), identity=me) as pool:
            # an address without a peer id (as expert declarations were): nothing proves who answers
            # there in plaintext, so the call is not signed for anyone, nor sent
            with pytest.raises(RequestRejected, match=rf"dial <peer_id>@127\.0\.0\.1:{port}"):
                await RpcClient(pool, NODE_SERVICE, Endpoint("127.0.0.1", port)).call("Ping", ping)
            assert recorder.calls == []
            # with its peer id, the call is signed for the recorder: useless anywhere else
            with pytest.raises(WireError):
                await RpcClient(pool, NODE_SERVICE, Endpoint("127.0.0.1", port), peer_id=member.peer_id).call("Ping", ping)
        (method, raw, metadata), = recorder.calls
        before = {name: rejected(service, "apiary_dht") for name, service in (("dht", run.dht), ("dht2", run.dht2))}
        for service in (run.dht, run.dht2):
            assert "access refused (wrong_audience)" in await replay(service.initial_peers, method, raw, metadata)
        # a call signed for no one (what peers sent before) is refused by every server
        unaddressed = CallCredentials(me, run.token("me")).metadata(method, digest=request_digest(raw))
        assert "access refused (audience_missing)" in await replay(run.dht2.initial_peers, method, raw, unaddressed)
    finally:
        await server.stop(0)
    after = rejected(run.dht2, "apiary_dht")
    assert after["wrong_audience"] == before["dht2"].get("wrong_audience", 0) + 1
    assert after["audience_missing"] == before["dht2"].get("audience_missing", 0) + 1
    assert run.dht2.status()["joined"]


@pytest.mark.parametrize("through", ["own_dht_node", "participants_dht"])
def test_a_mixture_of_experts_dials_the_private_runs_experts_as_its_dht_does(run: Run, through: str) -> None:
    # the experts are declared as peer_id@host:port; the layer signs its calls with the token of the
    # pool its DHT dials with: its own node's, or the one given to the client of the participant's dht
    if through == "own_dht_node":
        dht = run_sync(DHTNode.launch([PeerAddress.parse(run.dht.initial_peers)], identity=run.ids["me"],
                                      settings=DHTSettings(client_mode=True), wire=run.settings()), 30)
    else:
        assert run.dht.local_api is not None
        dht = DHTClient(run.dht.local_api, ChannelPool(run.settings(), identity=run.ids["me"]), timeout=10)
    try:
        moe = RemoteMixtureOfExperts(in_features=HIDDEN, grid_size=(1, 2), dht=dht, prefix="ffn", k_best=2)
        updates = run.experts.status()["updates"]
        x = torch.randn(4, HIDDEN, requires_grad=True)
        moe(x).pow(2).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert run.experts.status()["updates"] >= updates + 2  # both experts were reached and trained
        run_sync(moe.pool.close(), 10)
    finally:
        if isinstance(dht, DHTNode):
            run_sync(dht.shutdown(), 30)
