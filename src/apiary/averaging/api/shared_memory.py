"""The shared-memory segment through which a trainer and its averager on one host run rounds.

The trainer creates the segment (`create_segment`) and unlinks it when done; the averager maps
it (`map_segment`) and never unlinks it. Before Python 3.13, `SharedMemory(name)` hands an
attached segment to the process's resource tracker, which would unlink it when the averager
exits: the mapping is taken back from the tracker, unless this process created the segment
(trainer and averager in one process share one tracker, and the creator's entry must stay).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import torch

from apiary.averaging.api.spec import Schema
from apiary.wire import InvalidRequest

logger = logging.getLogger(__name__)

_created_here: set[str] = set()  # the segments this process created (and unlinks)


def create_segment(numel: int) -> SharedMemory:
    """A new segment for `numel` float32 values, owned by the caller (see `release_segment`)."""
    segment = SharedMemory(name=f"apiary_{uuid.uuid4().hex[:16]}", create=True, size=max(4 * numel, 1))
    _created_here.add(segment.name)
    return segment


def map_segment(name: str) -> SharedMemory:
    """Maps the trainer's segment `name`; raises InvalidRequest if it cannot."""
    try:
        if sys.version_info >= (3, 13):
            return SharedMemory(name=name, track=False)  # type: ignore[call-arg]
        segment = SharedMemory(name=name)
    except FileNotFoundError:
        raise InvalidRequest(
            f"no shared memory segment named {name!r} on the averager's host (is the trainer on another "
            f"host or in another IPC namespace? then register without shared memory)"
        ) from None
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"cannot map shared memory segment {name!r}: {e}") from None
    if os.name == "posix" and name not in _created_here:
        resource_tracker.unregister(f"/{name}", "shared_memory")  # what SharedMemory registered
    return segment


def release_segment(segment: SharedMemory | None, *, unlink: bool = False) -> None:
    """Unmaps the segment once no tensor views it (else it stays mapped until the process
    exits); with `unlink`, the creator also removes it."""
    if segment is None:
        return
    try:
        segment.close()
    except BufferError:
        logger.warning("shared memory segment %s is still in use; leaving it mapped", segment.name)
    if unlink:
        _created_here.discard(segment.name)
        try:
            segment.unlink()
        except FileNotFoundError:
            pass


def float32_views(segment: SharedMemory, schema: Schema) -> list[torch.Tensor]:
    """Float32 views into the segment, one per tensor of `schema`, shaped like it."""
    flat = torch.frombuffer(segment.buf, dtype=torch.float32, count=schema.numel)
    return [part.view(shape) for part, (_, shape) in zip(flat.split(schema.numels), schema.tensors)]
