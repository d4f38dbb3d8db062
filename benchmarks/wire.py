"""Throughput of one large tensor through apiary.wire against a plain TCP socket.

Sends one tensor (256 MiB by default) from this process to a server process over loopback
three ways, each delivering the whole tensor into a buffer in the receiver's memory:
  raw   - a plain non-blocking socket: length prefix, then the bytes received into a buffer
          that is reused across runs (the reference: what the socket can do);
  bulk  - apiary.wire's bulk transport (BulkClient -> the Probe's bulk Sink route, which also
          receives into a buffer reused across requests);
  grpc  - apiary.wire's gRPC chunk stream (RpcClient -> Probe.Sink, 4 MiB TensorChunks,
          which also computes a SHA-256 of the tensor).
Prints MB/s for each and its ratio to raw. Bit-exactness is checked once, untimed.
Usage: python benchmarks/wire.py [--mib 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import statistics
import subprocess
import sys
import time

from record import save

ACK = b"k"


async def serve() -> None:
    """The receiving process: an apiary.wire server and a raw TCP receiver, ports printed as JSON."""
    from apiary.wire import Identity, RpcServer, WireSettings

    server = RpcServer(WireSettings(listen_host="127.0.0.1", tls=False), Identity.generate())  # plaintext, as the figures in docs/benchmarks.md (benchmarks/trust.py measures TLS)
    await server.start()
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    print(json.dumps({"grpc": server.port, "bulk": server.bulk.port, "raw": listener.getsockname()[1]}), flush=True)
    connection, _ = await loop.sock_accept(listener)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    size = bytearray(8)
    while await _recv_into(loop, connection, memoryview(size)):  # until the measuring process hangs up
        if len(buffer) != int.from_bytes(size, "little"):
            buffer = bytearray(int.from_bytes(size, "little"))
        await _recv_into(loop, connection, memoryview(buffer))
        await loop.sock_sendall(connection, ACK)
    await server.stop()


async def _recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, buffer: memoryview) -> bool:
    """Fills `buffer`; returns False if the peer hung up first."""
    filled = 0
    while filled < len(buffer):
        received = await loop.sock_recv_into(sock, buffer[filled:])
        if not received:
            return False
        filled += received
    return True


async def measure(ports: dict[str, int], mib: int, repeats: int) -> dict[str, float]:
    import torch

    from apiary.wire import PROBE, ChannelPool, Endpoint, RpcClient, WireSettings
    from apiary.wire.bulk import BulkClient
    from apiary.wire.probe import SINK_ROUTE
    from apiary.wire.protos.wire_pb2 import SinkReply, SinkRequest
    from apiary.wire.tensors import tensor_payload, tensor_to_chunks

    tensor = torch.randint(0, 256, (mib << 20,), dtype=torch.uint8)
    nbytes = tensor.numel()
    digest = hashlib.sha256(tensor.numpy()).digest()
    settings = WireSettings(tls=False)  # plaintext, as the figures in docs/benchmarks.md (benchmarks/trust.py measures TLS)
    pool, bulk = ChannelPool(settings), BulkClient(settings)
    grpc_client = RpcClient(pool, PROBE, Endpoint("127.0.0.1", ports["grpc"]), timeout=600)
    bulk_endpoint = Endpoint("127.0.0.1", ports["bulk"])

    async def send_bulk(check: bool = False) -> None:
        body, _ = await bulk.call(bulk_endpoint, SINK_ROUTE, body=SinkRequest(digest=check).SerializeToString(),
                                  tensors=[tensor_payload(tensor)], timeout=600)
        assert not check or SinkReply.FromString(body).tensors[0].sha256 == digest, "bulk: different bytes arrived"

    async def send_grpc() -> None:
        async def chunks():
            for chunk in tensor_to_chunks(tensor, settings.chunk_bytes):
                yield chunk

        reply = await grpc_client.call("Sink", chunks())
        assert reply.tensors[0].sha256 == digest, "grpc: different bytes arrived"

    loop = asyncio.get_running_loop()
    raw = socket.create_connection(("127.0.0.1", ports["raw"]))
    raw.setblocking(False)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = memoryview(tensor.numpy())

    async def send_raw() -> None:
        await loop.sock_sendall(raw, nbytes.to_bytes(8, "little"))
        await loop.sock_sendall(raw, payload)
        assert await loop.sock_recv(raw, 1) == ACK

    await send_bulk(check=True)
    results: dict[str, list[float]] = {"raw": [], "bulk": [], "grpc": []}
    for _ in range(repeats):
        for name, send in (("raw", send_raw), ("bulk", send_bulk), ("grpc", send_grpc)):
            started = time.perf_counter()
            await send()
            results[name].append(nbytes / (time.perf_counter() - started) / 1e6)
    raw.close()
    await bulk.close()
    await pool.close()
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="tensor size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        rates = asyncio.run(measure(json.loads(server.stdout.readline()), args.mib, args.repeats))
    finally:
        if server.wait(timeout=30) is None:
            server.kill()
    print(f"{args.mib} MiB tensor, two processes over loopback, median of {args.repeats} runs")
    for name, label in (("raw", "raw TCP socket (reference)"), ("bulk", "apiary.wire bulk transport"),
                        ("grpc", "apiary.wire gRPC chunk stream")):
        print(f"{label:32s} {rates[name]:8.0f} MB/s   ratio to raw {rates[name] / rates['raw']:.2f}")
    save("wire", {"mib": args.mib, "repeats": args.repeats, "mb_per_s": rates})


if __name__ == "__main__":
    main()
