"""The framing of the bulk transport (`apiary.wire.bulk`): what goes over its TCP connections.

A client opens a connection with `MAGIC`; then each request and each reply is a frame, a
4-byte big-endian length and a `BulkRequest` or `BulkReply`, followed by the raw bytes of the
tensors the frame declares. `Connection` reads and writes whole frames and whole buffers over a
non-blocking socket (plain or TLS); the checks here run on every frame before any tensor byte
is received.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import ssl
from collections.abc import Sequence

from apiary.wire.address import Endpoint
from apiary.wire.auth import request_digest
from apiary.wire.chunks import Budget, check_header
from apiary.wire.errors import InvalidRequest, PayloadTooLarge
from apiary.wire.protos.wire_pb2 import BulkReply, BulkRequest, TensorHeader
from apiary.wire.rpc import decode
from apiary.wire.settings import WireSettings
from apiary.wire.tls import TlsSocket

MAGIC = b"APIARY-BULK/1\n"
MAX_TENSORS_PER_REQUEST = 4096
_LENGTH_BYTES = 4
_LAZY_BUFFER_BYTES = 1 << 20  # buffers from this size up are committed page by page, as bytes arrive


class Connection:
    """A non-blocking socket (plain or TLS) with whole-frame and whole-buffer reads and writes."""

    def __init__(self, sock: socket.socket, budget: Budget | None = None, stall_timeout: float | None = None):
        self._scratch: bytearray | memoryview = bytearray()
        self.budget = budget  # where the peer's frames and tensors (the reused buffer's too) are reserved
        self._stall_timeout = stall_timeout  # seconds a read may wait for the peer's next byte
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.tls: TlsSocket | None = None
        self.peer_id: str | None = None  # the id a TLS server proved

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool) -> TlsSocket:
        tls = TlsSocket(self.sock, context, server_side=server_side)
        await tls.handshake()
        self.tls = tls
        return tls

    async def _recv_into(self, buffer: memoryview) -> int:
        async with asyncio.timeout(self._stall_timeout):  # TimeoutError: the peer stalled
            if self.tls is not None:
                return await self.tls.recv_into(buffer)
            return await self.loop.sock_recv_into(self.sock, buffer)

    async def send(self, data: bytes | memoryview) -> None:
        if self.tls is not None:
            await self.tls.sendall(data)
        else:
            await self.loop.sock_sendall(self.sock, data)

    async def read_into(self, buffer: memoryview) -> None:
        filled = 0
        while filled < len(buffer):
            received = await self._recv_into(buffer[filled:])
            if received == 0:
                raise ConnectionError(f"connection closed after {filled} of {len(buffer)} bytes")
            filled += received

    async def read_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        await self.read_into(memoryview(buffer))
        return buffer

    async def read_frame(self, max_bytes: int) -> bytes:
        size = int.from_bytes(await self.read_exactly(_LENGTH_BYTES), "big")
        if size > max_bytes:
            raise PayloadTooLarge(f"bulk frame of {size} bytes exceeds the limit max_message_bytes={max_bytes}")
        if self.budget is not None:
            self.budget.take(size, "a bulk frame")
        try:
            return bytes(await self.read_exactly(size))
        finally:
            if self.budget is not None:
                self.budget.give_back(size)

    async def write_frame(self, message: BulkRequest | BulkReply, payloads: Sequence[memoryview] = ()) -> None:
        frame = message.SerializeToString()
        await self.send(len(frame).to_bytes(_LENGTH_BYTES, "big") + frame)
        for payload in payloads:
            if len(payload):
                await self.send(payload.cast("B"))

    async def read_payloads(
        self, headers: Sequence[TensorHeader], *, scratch: bool = False, into: Sequence[memoryview] = ()
    ) -> list[tuple[TensorHeader, bytearray | memoryview]]:
        """Receives each declared tensor into `into[i]` when given with the right size, else into
        a new buffer, or (scratch) into this connection's reused buffer, valid only until the
        next request on the connection. New buffers take memory as their bytes arrive."""
        if scratch and len(self._scratch) < (total := sum(header.nbytes for header in headers)):
            if self.budget is not None:
                self.budget.take(total - len(self._scratch), "a bulk request")
            self._scratch = receive_buffer(total)
        tensors: list[tuple[TensorHeader, bytearray | memoryview]] = []
        offset = 0
        for index, header in enumerate(headers):
            if index < len(into) and into[index].nbytes == header.nbytes:
                buffer: bytearray | memoryview = into[index].cast("B")
            elif scratch:
                buffer = memoryview(self._scratch)[offset : offset + header.nbytes]
                offset += header.nbytes
            else:
                buffer = receive_buffer(header.nbytes)
            await self.read_into(memoryview(buffer))
            tensors.append((header, buffer))
        return tensors

    def idle_and_open(self) -> bool:
        """Whether an idle connection can carry a request: the peer neither closed it nor sent anything."""
        if self.tls is not None and self.tls.pending():
            return False
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    async def wait_readable(self, timeout: float) -> bool:
        """Waits until the peer sends something; False if it stays silent for `timeout` seconds
        (an idle connection is then closed, freeing its task and buffer)."""
        if self.tls is not None and self.tls.pending():
            return True
        readable = self.loop.create_future()
        self.loop.add_reader(self.sock.fileno(), lambda: readable.done() or readable.set_result(True))
        try:
            async with asyncio.timeout(timeout):
                return await readable
        except asyncio.TimeoutError:
            return False
        finally:
            self.loop.remove_reader(self.sock.fileno())

    def close(self) -> None:
        if self.budget is not None:
            self.budget.give_back(len(self._scratch))
        self._scratch = bytearray()
        self.sock.close()


def receive_buffer(nbytes: int) -> bytearray | memoryview:
    """A zeroed buffer for `nbytes` about to be received. A large one is an anonymous memory map:
    the system commits its pages only as they are written, so a peer that declares gigabytes and
    sends a few bytes costs a few pages, not the declared size (nor a pass to zero it)."""
    if nbytes < _LAZY_BUFFER_BYTES:
        return bytearray(nbytes)
    return memoryview(mmap.mmap(-1, nbytes))


def check_headers(headers: Sequence[TensorHeader], max_tensor_bytes: int, max_total_bytes: int | None) -> int:
    """Checks the tensors a frame declares against the limits; returns their total bytes."""
    if len(headers) > MAX_TENSORS_PER_REQUEST:
        raise InvalidRequest(f"{len(headers)} tensors in one request exceed the limit of {MAX_TENSORS_PER_REQUEST}")
    for header in headers:
        check_header(header, max_tensor_bytes)
    total = sum(header.nbytes for header in headers)
    if max_total_bytes is not None and total > max_total_bytes:
        raise PayloadTooLarge(f"{total} tensor bytes in one request exceed the limit max_bytes_in_flight={max_total_bytes}")
    return total


def signed_digest(request: BulkRequest) -> bytes:
    """What a private run's signature of a bulk request covers: its route, tensor headers and body."""
    return request_digest(BulkRequest(route=request.route, tensors=request.tensors, body=request.body).SerializeToString())


def parse_request(frame: bytes, settings: WireSettings) -> BulkRequest:
    """The request in a frame, each tensor header checked; InvalidRequest if malformed or too large.
    (Their total is reserved in the server's budget of bytes in flight before they are received.)"""
    request = decode(BulkRequest, frame)
    check_headers(request.tensors, settings.max_tensor_bytes, None)
    return request


def listening_socket(endpoint: Endpoint, purpose: str, backlog: int) -> socket.socket:
    """A non-blocking TCP socket listening at `endpoint` (rebinding despite TIME_WAIT); raises
    OSError naming `purpose` and the address if binding fails."""
    listener = socket.socket(socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET, socket.SOCK_STREAM)
    if os.name == "posix":  # a restarted peer rebinds its port despite connections in TIME_WAIT
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((endpoint.host, endpoint.port))
    except OSError as e:
        listener.close()
        raise OSError(e.errno, f"cannot listen for {purpose} on {endpoint}: {e.strerror}") from None
    listener.listen(backlog)
    listener.setblocking(False)
    return listener
