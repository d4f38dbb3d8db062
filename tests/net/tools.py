"""Small measuring tools run on the hosts (no ping or iperf on this machine):

    python -m net.tools sink --port 5001 [--skip 0.5]      # TCP: counts bytes, prints the rate
    python -m net.tools source --to 198.18.0.2:5001 --seconds 3
    python -m net.tools echo --port 5002                   # UDP echo
    python -m net.tools ping --to 198.18.0.2:5002 --count 20
    python -m net.tools connect --to 198.18.0.2:5003 --timeout 3
    python -m net.tools listen --port 5003                 # TCP: accepts connections
    python -m net.tools observe --port 5004                # TCP: tells each caller its address as seen
    python -m net.tools mapped --to 198.18.0.2:5004 --to 198.18.0.3:5004 --source-port 40000
    python -m net.tools punch --to 198.18.0.4:40000 --source-port 40000 --timeout 8
    python -m net.tools capture --device eth0 --seconds 10 --pattern 5ecret  # frames holding the text

Servers print `listening` once bound; every tool prints its result as one JSON line. Standard
library only: these start on the hosts while links are being measured.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time


def endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _report(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


def sink(port: int, skip: float) -> None:
    """Receives one TCP connection to its end; the rate counts only bytes after `skip` seconds
    (slow start is not the link's rate)."""
    with socket.create_server(("0.0.0.0", port)) as server:
        print("listening", flush=True)
        connection, _ = server.accept()
    buffer = bytearray(1 << 20)
    total = counted = 0
    with connection:
        started = time.monotonic()
        window_start: float | None = None
        while received := connection.recv_into(buffer):
            total += received
            now = time.monotonic()
            if window_start is None and now - started >= skip:
                window_start = now
            elif window_start is not None:
                counted += received
        ended = time.monotonic()
    window = ended - window_start if window_start is not None else 0.0
    _report({"bytes": total, "seconds": ended - started, "mbit_per_s": counted * 8 / window / 1e6 if window else 0.0})


def source(to: tuple[str, int], seconds: float) -> None:
    payload = memoryview(bytes(1 << 18))
    sent = 0
    with socket.create_connection(to, timeout=10) as connection:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            connection.sendall(payload)
            sent += len(payload)
    _report({"bytes": sent})


def echo(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("0.0.0.0", port))
        print("listening", flush=True)
        while True:
            data, sender = server.recvfrom(2048)
            server.sendto(data, sender)


def ping(to: tuple[str, int], count: int, interval: float, timeout: float) -> None:
    """UDP round trips, one at a time; a reply later than `timeout` counts as lost."""
    rtts: list[float] = []
    lost = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.connect(to)
        for sequence in range(count):
            sent = time.monotonic()
            client.send(struct.pack("!Id", sequence, sent))
            deadline = sent + timeout
            while True:
                client.settimeout(max(0.001, deadline - time.monotonic()))
                try:
                    reply = client.recv(2048)
                except (TimeoutError, ConnectionRefusedError):
                    lost += 1
                    break
                if struct.unpack("!Id", reply[:12])[0] == sequence:
                    rtts.append((time.monotonic() - sent) * 1000)
                    break
            time.sleep(max(0.0, sent + interval - time.monotonic()))
    _report({"rtts_ms": rtts, "lost": lost})


def connect(to: tuple[str, int], timeout: float, send: str) -> None:
    """Whether a TCP connection to `to` opens within `timeout` (refused and timed out differ:
    a closed port answers, a firewall that drops answers nothing); sends `send` on it, if any."""
    started = time.monotonic()
    try:
        with socket.create_connection(to, timeout=timeout) as connection:
            connection.sendall(send.encode())
        _report({"connected": True, "seconds": time.monotonic() - started})
    except OSError as e:
        _report({"connected": False, "error": repr(e), "seconds": time.monotonic() - started})


def listen(port: int) -> None:
    """Accepts TCP connections (and closes them) until killed."""
    with socket.create_server(("0.0.0.0", port)) as server:
        print("listening", flush=True)
        while True:
            connection, _ = server.accept()
            connection.close()


def _flow_of(frame: bytes) -> str:
    """`source:port>destination:port` of an Ethernet frame holding IPv4 TCP or UDP ("?" otherwise)."""
    if len(frame) < 38 or frame[12:14] != b"\x08\x00" or frame[23] not in (6, 17):
        return "?"
    transport = 14 + (frame[14] & 0x0F) * 4
    source_port, destination_port = struct.unpack_from("!HH", frame, transport)
    return f"{socket.inet_ntoa(frame[26:30])}:{source_port}>{socket.inet_ntoa(frame[30:34])}:{destination_port}"


def capture(device: str, seconds: float, pattern: str) -> None:
    """Reads every frame `device` sends or receives for `seconds` (a packet socket, as tcpdump
    does) and reports how many there were and the flows whose frames hold `pattern`."""
    needle = pattern.encode()
    frames = total = 0
    found: set[str] = set()
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as sock:  # ETH_P_ALL
        sock.bind((device, 0))
        sock.settimeout(0.1)
        print("listening", flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                frame = sock.recv(1 << 17)  # whole offload segments
            except TimeoutError:
                continue
            frames += 1
            total += len(frame)
            if needle in frame:
                found.add(_flow_of(frame))
    _report({"frames": frames, "bytes": total, "found": sorted(found)})


def _bound(source_port: int) -> socket.socket:
    """A TCP socket bound to `source_port` that other sockets may share (as hole punchers do)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", source_port))
    return sock


def observe(port: int) -> None:
    """Writes to each caller the address its connection came from (`host:port` and a newline)."""
    with socket.create_server(("0.0.0.0", port)) as server:
        print("listening", flush=True)
        while True:
            connection, (host, source_port) = server.accept()
            with connection:
                connection.sendall(f"{host}:{source_port}\n".encode())


def mapped(to: list[tuple[str, int]], source_port: int, timeout: float) -> None:
    """Connects from `source_port` to each `observe` server in turn, all connections open at
    once, and reports the address each server saw (the NAT's mapping per destination)."""
    seen: list[str] = []
    sockets: list[socket.socket] = []
    try:
        for destination in to:
            sock = _bound(source_port)
            sockets.append(sock)
            sock.settimeout(timeout)
            sock.connect(destination)
            seen.append(sock.makefile().readline().strip())
    finally:
        for sock in sockets:
            sock.close()
    _report({"source_port": source_port, "observed": seen})


def punch(to: tuple[str, int], source_port: int, timeout: float, message: str) -> None:
    """TCP simultaneous open: connects from `source_port` to `to` (the peer does the same the
    other way at about the same time); on success both sides exchange one line. Reports whether
    it connected, the peer's line, and the error otherwise."""
    started = time.monotonic()
    sock = _bound(source_port)
    sock.settimeout(timeout)
    try:
        with sock:
            sock.connect(to)
            sock.sendall(f"{message}\n".encode())
            heard = sock.makefile().readline().strip()
        _report({"connected": True, "heard": heard, "seconds": time.monotonic() - started})
    except OSError as e:
        _report({"connected": False, "error": repr(e), "seconds": time.monotonic() - started})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tools = parser.add_subparsers(dest="tool", required=True)
    for name in ("sink", "echo", "listen", "observe"):
        tool = tools.add_parser(name)
        tool.add_argument("--port", type=int, required=True)
        if name == "sink":
            tool.add_argument("--skip", type=float, default=0.5)
    for name in ("source", "ping", "connect", "mapped", "punch"):
        tool = tools.add_parser(name)
        tool.add_argument("--to", type=endpoint, required=True, action="append" if name == "mapped" else "store")
        if name == "source":
            tool.add_argument("--seconds", type=float, default=3.0)
        if name == "ping":
            tool.add_argument("--count", type=int, default=10)
            tool.add_argument("--interval", type=float, default=0.05)
        if name in ("ping", "connect", "mapped", "punch"):
            tool.add_argument("--timeout", type=float, default=2.0)
        if name in ("mapped", "punch"):
            tool.add_argument("--source-port", type=int, required=True)
        if name == "punch":
            tool.add_argument("--message", default="hello")
        if name == "connect":
            tool.add_argument("--send", default="", help="text to send once connected")
    tool = tools.add_parser("capture")
    tool.add_argument("--device", default="eth0")
    tool.add_argument("--seconds", type=float, required=True)
    tool.add_argument("--pattern", required=True)
    args = parser.parse_args(argv)
    if args.tool == "sink":
        sink(args.port, args.skip)
    elif args.tool == "source":
        source(args.to, args.seconds)
    elif args.tool == "echo":
        echo(args.port)
    elif args.tool == "ping":
        ping(args.to, args.count, args.interval, args.timeout)
    elif args.tool == "connect":
        connect(args.to, args.timeout, args.send)
    elif args.tool == "observe":
        observe(args.port)
    elif args.tool == "mapped":
        mapped(args.to, args.source_port, args.timeout)
    elif args.tool == "punch":
        punch(args.to, args.source_port, args.timeout, args.message)
    elif args.tool == "capture":
        capture(args.device, args.seconds, args.pattern)
    else:
        listen(args.port)


if __name__ == "__main__":
    main()
