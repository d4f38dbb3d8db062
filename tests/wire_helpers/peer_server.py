"""A peer in its own process for the cross-process wire tests.

Serves an `RpcServer` (probe service and bulk transport) on 127.0.0.1 (ports chosen by the OS
unless given), prints one JSON line with its ports and peer id, and runs until its stdin closes (so it
never outlives the test process that started it) or it gets SIGTERM.

    python -m tests.wire_helpers.peer_server [--identity PATH] [--port N] [--max-tensor-bytes N] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading

from apiary.wire import Identity, RpcServer, WireSettings


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--identity", help="identity file (load or create); default: a fresh identity")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (default: any free port)")
    parser.add_argument("--bulk-port", type=int, default=0, help="bulk port (default: any free port)")
    parser.add_argument("--max-tensor-bytes", type=int)
    parser.add_argument("--max-message-bytes", type=int)
    parser.add_argument("--chunk-bytes", type=int)
    parser.add_argument("--tls", action="store_true", help="TLS (the default of services); else plaintext for raw frames")
    parser.add_argument("--relay", action="store_true", help="offer relaying (apiary.wire.relay) on a port of its own")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    limits = {
        name: value
        for name, value in (
            ("max_tensor_bytes", args.max_tensor_bytes),
            ("max_message_bytes", args.max_message_bytes),
            ("chunk_bytes", args.chunk_bytes),
        )
        if value is not None
    }
    settings = WireSettings(  # plaintext unless --tls: most wire tests send it raw frames and bytes
        listen_host="127.0.0.1", port=args.port, bulk_port=args.bulk_port, shutdown_grace=0.5, tls=args.tls,
        relay=args.relay, **limits
    )
    identity = Identity.load_or_create(args.identity) if args.identity else Identity.generate()
    server = RpcServer(settings, identity)
    await server.start()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)

    def wait_for_stdin_eof() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stopping.set)

    threading.Thread(target=wait_for_stdin_eof, daemon=True).start()
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "port": server.port,
                "bulk_port": server.bulk.port if server.bulk is not None else None,
                "relay_port": server.relay.port if server.relay is not None else None,
                "peer_id": identity.peer_id,
                "settings": settings.model_dump(),
            }
        ),
        flush=True,
    )
    await stopping.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(_parse_args(argv)))


if __name__ == "__main__":
    main()
