"""The screening verdicts of the whole farm: one table in shared memory that every worker reads
and writes, so a client looked up by one worker is known to all of them.

The table is an anonymous shared mapping (``mmap(-1, n)``: MAP_SHARED) that the supervisor
allocates before it forks the workers (:func:`prepare`); a worker finds it with
:func:`shared`. It has a fixed number of slots (bounded memory); a client address hashes to
a run of :data:`PROBES` slots, and a new verdict takes an empty or expired one, else the one
that expires first. A slot holds the address, when the verdict expires (the clock is
``time.monotonic``, the same for every process of the host), a fingerprint of the lists it was
computed with, and which of them list the client; a CRC over the slot makes a torn read (two
workers writing the same slot at once) a miss, never a wrong verdict. No locks.
"""

from __future__ import annotations

import ipaddress
import mmap
import struct
import time
import zlib
from collections.abc import Callable

__all__ = ["PROBES", "SLOT_SIZE", "VerdictCache", "prepare", "shared"]

#: address (16 octets, IPv4 mapped), expires, fingerprint, listed mask, crc.
_SLOT = struct.Struct("<16sdIQI")
SLOT_SIZE = 48
#: Slots a client address may take (a run from its hash).
PROBES = 4

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _key(address: IPAddress) -> bytes:
    if isinstance(address, ipaddress.IPv4Address):
        return b"\0" * 10 + b"\xff\xff" + address.packed
    return address.packed


class VerdictCache:
    """``slots`` verdicts in ``memory`` (a shared mapping, or any writable buffer)."""

    def __init__(
        self,
        slots: int,
        memory: mmap.mmap | bytearray | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < PROBES:
            raise ValueError(f"a verdict cache needs at least {PROBES} slots")
        self.slots = slots
        self.memory = memory if memory is not None else mmap.mmap(-1, slots * SLOT_SIZE)
        self._view = memoryview(self.memory)
        self._clock = clock

    def _start(self, key: bytes) -> int:
        return zlib.crc32(key) % self.slots

    def _read(self, index: int) -> tuple[bytes, float, int, int] | None:
        offset = index * SLOT_SIZE
        raw = bytes(self._view[offset : offset + _SLOT.size])
        key, expires, fingerprint, listed, crc = _SLOT.unpack(raw)
        if expires == 0.0 or zlib.crc32(raw[:-4]) != crc:
            return None
        return key, expires, fingerprint, listed

    def get(self, address: IPAddress, fingerprint: int) -> int | None:
        """The lists (a bit mask) that list ``address``, if a live verdict for the same lists
        is cached; else None."""
        key = _key(address)
        now = self._clock()
        start = self._start(key)
        for probe in range(PROBES):
            slot = self._read((start + probe) % self.slots)
            if slot is not None and slot[0] == key:
                _, expires, cached_fingerprint, listed = slot
                if expires > now and cached_fingerprint == fingerprint:
                    return listed
        return None

    def put(self, address: IPAddress, fingerprint: int, listed: int, ttl: float) -> None:
        """Remember a verdict for ``ttl`` seconds."""
        key = _key(address)
        now = self._clock()
        start = self._start(key)
        chosen, soonest = None, None
        for probe in range(PROBES):
            index = (start + probe) % self.slots
            slot = self._read(index)
            if slot is None or slot[0] == key or slot[1] <= now:
                chosen = index
                break
            if soonest is None or slot[1] < soonest[1]:
                soonest = (index, slot[1])
        if chosen is None:
            assert soonest is not None
            chosen = soonest[0]
        body = _SLOT.pack(key, now + ttl, fingerprint & 0xFFFFFFFF, listed, 0)[:-4]
        offset = chosen * SLOT_SIZE
        self._view[offset : offset + _SLOT.size] = body + struct.pack("<I", zlib.crc32(body))

    def live(self) -> int:
        """How many slots hold a live verdict (for tests and diagnostics)."""
        now = self._clock()
        return sum(
            1
            for index in range(self.slots)
            if (slot := self._read(index)) is not None and slot[1] > now
        )


_shared: VerdictCache | None = None


def prepare(slots: int) -> VerdictCache:
    """In the supervisor, before forking: the shared table (allocated once per size)."""
    global _shared
    if _shared is None or _shared.slots != slots:
        _shared = VerdictCache(slots)
    return _shared


def shared() -> VerdictCache | None:
    """The table the supervisor prepared (inherited at fork), if any."""
    return _shared
