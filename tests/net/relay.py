"""The user-space half of a shaped link: latency, jitter, loss and dial-out-only filtering.

The kernel here has no netem, so a host whose link needs any of these gets two TAP devices
instead of a veth pair: `eth0` inside the host's namespace and `<host>` on the switch's bridge,
and this process copies frames between them:

    host stack -> eth0 (TAP) -> relay: hold delay ± jitter, drop loss -> <host> (TAP) -> bridge
    bridge -> <host> (TAP) -> relay: the same, and the dial-out-only filter -> eth0 -> host stack

Rates are not the relay's business: `tbf` on both TAPs limits them in the kernel, before the
relay holds the frames (a link serializes, then propagates).

Speed: the TAPs are opened with a virtio-net header and TSO/checksum offloads, so the host's
TCP hands the relay segments of up to 64 KiB that pass through whole (the kernel segments them
later if it must): tens of frames per megabyte, not hundreds. With loss configured the offloads
are off, so that a drop loses one packet of the wire, as on a real link.

Frames keep their order: a frame is released at the later of its own due time and the previous
frame's (jitter never reorders, as on a single path).

Dial-out-only (a host behind a NAT, as a stateful firewall sees it): frames towards the host
pass only if they answer a flow the host opened (same TCP/UDP 5-tuple reversed, or an ICMP
echo reply to its echo request; ICMP errors pass as "related"; ARP passes). Anything else — a
TCP SYN from outside, a UDP datagram nobody asked for — is dropped silently, so a peer dialing
in sees its connection time out, exactly as behind a real NAT.

Run by `net.network` inside the host's namespace (its router's, behind a NAT) as `python -m
net.relay ...` (with `tests/` on the path); it creates the host's TAP there, moves into the switch's namespace for good
(so cleanup finds it among that namespace's processes), creates the switch's TAP, prints one
line `ready`, and runs until killed (it dies with the test process); the TAPs, which only this
process holds, disappear with it.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import random
import select
import signal
import struct
import sys
import time
from collections.abc import Callable

from net.netns import enter

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
VNET_HDR = 10  # struct virtio_net_hdr, the default size
MAX_FRAME = VNET_HDR + 65536 + 14 + 4  # a whole GSO segment with its Ethernet header
BATCH = 256  # frames read from one TAP before the other gets its turn
ETHERNET = VNET_HDR  # offset of the Ethernet header in what a TAP read returns
IP = ETHERNET + 14
FLOW_TABLE_LIMIT = 65536


def open_tap(name: str, offloads: int) -> int:
    """Creates TAP `name` in the calling thread's namespace; returns its non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
    except OSError:
        os.close(fd)
        raise
    return fd


class DialOutOnly:
    """Remembers the flows a host opened; lets in only frames that answer one."""

    def __init__(self) -> None:
        self.flows: dict[tuple[int, bytes, int, bytes, int], float] = {}

    @staticmethod
    def _flow(frame: bytes) -> tuple[int, bytes, int, bytes, int] | None:
        """(protocol, source, source port or echo id, destination, destination port or id), or
        None for what is not TCP, UDP or ICMP echo over IPv4."""
        if frame[ETHERNET + 12:ETHERNET + 14] != b"\x08\x00" or len(frame) < IP + 20:
            return None
        header = (frame[IP] & 0x0F) * 4
        protocol = frame[IP + 9]
        source, destination = frame[IP + 12:IP + 16], frame[IP + 16:IP + 20]
        transport = IP + header
        if protocol in (6, 17) and len(frame) >= transport + 4:
            source_port, destination_port = struct.unpack_from("!HH", frame, transport)
            return protocol, source, source_port, destination, destination_port
        if protocol == 1 and len(frame) >= transport + 6 and frame[transport] in (0, 8):
            (echo_id,) = struct.unpack_from("!H", frame, transport + 4)
            return protocol, source, echo_id, destination, echo_id
        return None

    def outbound(self, frame: bytes) -> bool:
        flow = self._flow(frame)
        if flow is not None:
            if len(self.flows) >= FLOW_TABLE_LIMIT:
                self.flows.clear()  # long idle flows are forgotten, as a NAT's table does
            self.flows[flow] = time.monotonic()
        return True

    def inbound(self, frame: bytes) -> bool:
        ethertype = frame[ETHERNET + 12:ETHERNET + 14]
        if ethertype == b"\x08\x06":  # ARP: the link itself
            return True
        if ethertype != b"\x08\x00" or len(frame) < IP + 20:
            return False
        flow = self._flow(frame)
        if flow is None:
            header = (frame[IP] & 0x0F) * 4
            return frame[IP + 9] == 1 and len(frame) > IP + header and frame[IP + header] in (3, 11)  # ICMP errors
        protocol, source, source_port, destination, destination_port = flow
        return (protocol, destination, destination_port, source, source_port) in self.flows


class Direction:
    """Frames read from one TAP, held until due, then written to the other."""

    def __init__(self, source: int, sink: int, delay: float, jitter: float, loss: float,
                 admit: Callable[[bytes], bool] | None, rng: random.Random):
        self.source, self.sink = source, sink
        self.delay, self.jitter, self.loss = delay, jitter, loss
        self.admit = admit
        self.rng = rng
        self.held: collections.deque[tuple[float, bytes]] = collections.deque()
        self.last_due = 0.0
        self.frames = self.dropped = 0

    def read(self, now: float) -> None:
        for _ in range(BATCH):
            try:
                frame = os.read(self.source, MAX_FRAME)
            except BlockingIOError:
                return
            self.frames += 1
            if (self.loss and self.rng.random() < self.loss) or (self.admit is not None and not self.admit(frame)):
                self.dropped += 1
                continue
            if self.delay == 0 and self.jitter == 0 and not self.held:
                self._write(frame)
                continue
            due = now + self.delay
            if self.jitter:
                due += self.rng.uniform(-self.jitter, self.jitter)
            self.last_due = due = max(due, self.last_due)
            self.held.append((due, frame))

    def release(self, now: float) -> float | None:
        """Writes every frame that is due; returns when the next one is (None: none held)."""
        held = self.held
        while held and held[0][0] <= now:
            self._write(held.popleft()[1])
        return held[0][0] if held else None

    def _write(self, frame: bytes) -> None:
        try:
            os.write(self.sink, frame)
        except (BlockingIOError, OSError):
            self.dropped += 1  # the receiving side is full or gone: the frame is lost, as on a wire


def run(directions: list[Direction]) -> None:
    poller = select.epoll()
    by_fd = {direction.source: direction for direction in directions}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    next_due: float | None = None
    while True:
        timeout = -1.0 if next_due is None else max(0.0, next_due - time.monotonic())
        events = poller.poll(timeout)
        now = time.monotonic()
        for fd, _ in events:
            by_fd[fd].read(now)
        next_due = None
        for direction in directions:
            due = direction.release(now)
            if due is not None and (next_due is None or due < next_due):
                next_due = due


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-device", default="eth0")
    parser.add_argument("--switch-netns", required=True)
    parser.add_argument("--switch-device", required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="± uniform, each direction")
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of frames dropped, each direction")
    parser.add_argument("--dial-out-only", action="store_true", help="let in only answers to flows the host opened")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    offloads = TUN_F_CSUM if args.loss else TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    host = open_tap(args.host_device, offloads)  # we were started inside the host's namespace
    enter(args.switch_netns)  # stay there: cleanup finds the relay among the switch's processes
    switch = open_tap(args.switch_device, offloads)
    rng = random.Random(args.seed)
    delay, jitter = args.delay_ms / 1000, args.jitter_ms / 1000
    firewall = DialOutOnly() if args.dial_out_only else None
    outbound = Direction(host, switch, delay, jitter, args.loss, firewall.outbound if firewall else None, rng)
    inbound = Direction(switch, host, delay, jitter, args.loss, firewall.inbound if firewall else None, rng)
    print("ready", flush=True)
    run([outbound, inbound])


if __name__ == "__main__":
    main()
