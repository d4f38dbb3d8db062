"""A worker process of the DHT test swarm: M real `DHTNode`s in one process.

Started by `tests/dht_swarm.py` (or by hand):

    python tests/dht_swarm_worker.py --nodes 4 [--initial-peers ID@HOST:PORT,...] [--settings JSON]

With `--wait-for-peers` it first reads one JSON line from stdin, `{"initial_peers": [...]}`, so
a harness can start many workers at once (paying the imports in parallel) and hand each its
peers when earlier workers are up. The first node joins through the initial peers (none: it
starts a new swarm); each further node joins through a random earlier node of this worker or
an initial peer. Each node's local API (`LOCAL_SERVICE`) is served on 127.0.0.1, port 0.

Prints one JSON line per node, `{"address", "peer_id", "port", "local_port"}`, then
`{"ready": true, "pid": ...}`, and runs until SIGTERM/SIGINT or until its stdin closes (so it
never outlives the process that started it); then it shuts every node down and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import threading

from worker_support import die_with_parent, emit

from apiary.dht import DHTNode, DHTSettings
from apiary.dht.api import LOCAL_SERVICE, LocalServicer
from apiary.wire import PeerAddress, RpcServer, WireSettings, parse_peer_list


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=4, help="DHT nodes in this process")
    parser.add_argument("--initial-peers", default="", help="peers the first node joins through (comma-separated)")
    parser.add_argument("--wait-for-peers", action="store_true", help="read {'initial_peers': [...]} from stdin first")
    parser.add_argument("--settings", default="{}", help="DHTSettings fields as JSON")
    return parser.parse_args(argv)



async def run(args: argparse.Namespace, initial_peers: list[PeerAddress], stop: asyncio.Event) -> None:
    settings = DHTSettings(**json.loads(args.settings))
    wire = WireSettings(listen_host="127.0.0.1", port=0, bulk=False, shutdown_grace=0.2)
    nodes: list[DHTNode] = []
    local_servers: list[RpcServer] = []
    try:
        for _ in range(args.nodes):
            if stop.is_set():
                return
            choices = initial_peers + [PeerAddress.parse(node.address) for node in nodes]
            peers = [random.choice(choices)] if choices else []
            node = await DHTNode.launch(peers, settings=settings, wire=wire)
            nodes.append(node)
            local = RpcServer(wire.for_local_api("127.0.0.1", 0), node.identity)
            local.add_service(LOCAL_SERVICE, LocalServicer(node))
            await local.start()
            local_servers.append(local)
            emit({"address": node.address, "peer_id": node.identity.peer_id,
                   "port": node.server.port, "local_port": local.port})
        emit({"ready": True, "pid": os.getpid()})
        await stop.wait()
    finally:
        for local in local_servers:
            await local.stop(0)
        await asyncio.gather(*(node.shutdown() for node in nodes), return_exceptions=True)


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Sets `stop` when stdin closes: the harness that started us is gone or done."""

    def wait() -> None:  # raw reads: a daemon thread blocked in a buffered read aborts at exit
        try:
            while os.read(sys.stdin.fileno(), 65536):
                pass
        except OSError:
            pass
        finally:
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait, daemon=True).start()


async def main_async(args: argparse.Namespace, initial_peers: list[PeerAddress]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _watch_stdin(loop, stop)
    await run(args, initial_peers, stop)




def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    args = _parse_args(argv)
    initial_peers = parse_peer_list(args.initial_peers)
    if args.wait_for_peers:
        line = sys.stdin.readline()
        if not line:
            return  # the harness went away before handing us peers
        initial_peers += [PeerAddress.parse(text) for text in json.loads(line)["initial_peers"]]
    asyncio.run(main_async(args, initial_peers))


if __name__ == "__main__":
    main()
