"""Entering a named network namespace from Python (`ip netns add` names live in /run/netns).

A network namespace is a property of a thread: `entered(name)` moves the calling thread into
the namespace and back, and a socket keeps the namespace it was created in, so

    with entered("apnet-1-h0"):
        sock = socket.socket()
    sock.connect(("127.0.0.1", port))   # the loopback of host h0

reaches a port that exists only inside that namespace.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def path_of(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def setns(fd: int) -> None:
    """Moves the calling thread into the network namespace open as `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


def enter(name: str) -> None:
    """Moves the calling thread into namespace `name` for good (a process that should be
    counted among the namespace's processes, as `ip netns pids` lists them)."""
    target = os.open(path_of(name), os.O_RDONLY)
    try:
        setns(target)
    finally:
        os.close(target)


@contextmanager
def entered(name: str) -> Iterator[None]:
    """The calling thread is inside namespace `name` for the duration of the block."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter(name)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)
