"""Per-client-IP limits across the farm: one table of counters in shared memory.

The supervisor maps the table (:class:`AnvilTable`, :data:`TABLE_SLOTS` slots of 64 octets of
shared anonymous memory) before it forks any worker, so every worker of every generation sees
the same counters; each worker's limiter (:class:`SharedLimiter`) reads and updates them
itself, with no round trip to the supervisor. Every change happens under one lock
(:class:`~farm.supervisor.shared_lock.SharedLock`, a robust process-shared mutex: no system
call unless contended): exact counts whatever the number of workers (a client cannot multiply
its allowance by it), and a worker that dies holding the lock does not leave it locked.

A slot holds a client key (an IPv4 address, or an IPv6 address or prefix), its session count
and two token buckets (messages, AUTH attempts), with the same arithmetic as
:class:`farm.limits.Anvil`. Slots are found by open addressing from a hash of the key (Python's
keyed string hash, the same in every process forked from the supervisor, so a client cannot
aim at collisions); a slot whose client has no session and full buckets may be taken by
another client. When the :data:`PROBES` slots a key may use are all busy, that client is let in
uncounted (an MX should not refuse mail because its own bookkeeping is full) and a warning is
logged.

Per connection, one look at the table: the admission (which also leases one message of the
client's rate along with the session); a session that sends more leases up to
:data:`MESSAGE_LEASE` at a time (at most an eighth of the rate), one look per lease, and what
it leaves unused comes back when it ends (meanwhile other sessions of the client may be
refused a little early, never let past). A session's end is noted by its worker and taken off
the table with that worker's next admission, under the same lock, or within
:data:`CLOSE_DELAY` seconds; until then the count errs on the high side only.

Giving back a dead worker's sessions: each worker also has a private region (one counter per
slot, also mapped by the supervisor before that worker's fork) of the sessions it holds; when
the supervisor reaps a worker it subtracts what that region still holds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import mmap
import struct
import time
from collections.abc import Callable
from typing import Final

from farm.limits import KEY_CACHE, UNKNOWN_CLIENT, ClientLimits, Limiter
from farm.supervisor.shared_lock import SharedLock

__all__ = ["MESSAGE_LEASE", "PROBES", "TABLE_SLOTS", "AnvilTable", "SharedLimiter", "TableKey"]

log = logging.getLogger("farm.anvil")

#: Slots in the table (a power of two): 4 MiB of shared memory.
TABLE_SLOTS: Final = 65536
#: Slots a key may occupy, from its hash on.
PROBES: Final = 32
#: Words (8 octets) per slot: tag, address high, address low, sessions, then the buckets.
_WORDS: Final = 8
#: The words of a slot, in order (Final: compiled, each read is a constant, not a lookup).
_TAG: Final = 0
_HIGH: Final = 1
_LOW: Final = 2
_SESSIONS: Final = 3
_MSG_TOKENS: Final = 4
_MSG_STAMP: Final = 5
_AUTH_TOKENS: Final = 6
_AUTH_STAMP: Final = 7
_SLOT_SIZE: Final = _WORDS * 8
#: A slot's first six words (tag, high, low, sessions, message tokens and stamp), and the
#: three an admission writes (sessions, message tokens and stamp): one call each.
_HEAD: Final = struct.Struct("4Q2d")
_COUNTS: Final = struct.Struct("Q2d")
#: Seconds a worker may wait to take its closed sessions off the table, when no admission
#: (which does it at once, under the same lock) comes first. Meanwhile the count is higher
#: than the truth, never lower: a client is at worst refused a little early, never let past.
CLOSE_DELAY: Final = 0.05
#: The most messages a session's MAIL leases from the table at a time (SharedLimiter).
MESSAGE_LEASE: Final = 8
#: At most one "table full" warning per this many seconds.
WARN_INTERVAL: Final = 10.0

#: A client's place in the table: (hash, tag, high 64 bits, low 64 bits); tag 4 or 6 | prefix.
TableKey = tuple[int, int, int, int]


#: The tag of the ``unknown`` key (an address's is 4, or 6 plus its prefix length; 0: unused).
_UNKNOWN_TAG: Final = 1


def table_key(key: str) -> TableKey:
    """The table key of a limiter key (``192.0.2.1``, ``2001:db8::1`` or ``2001:db8::/64``,
    or ``unknown``: the sessions whose PROXY header named no usable source)."""
    if key == UNKNOWN_CLIENT:
        return hash(key), _UNKNOWN_TAG, 0, 0
    network = ipaddress.ip_network(key)
    value = int(network.network_address)
    tag = 4 if network.version == 4 else 6 | (network.prefixlen << 8)
    return hash(key), tag, value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF


class AnvilTable:
    """The counters, in a shared mapping; :meth:`new_region` for each worker before its fork."""

    def __init__(
        self, slots: int = TABLE_SLOTS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if slots < PROBES or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two >= {PROBES}")
        self.slots = slots
        self._mask = slots - 1
        self._clock = clock
        self._map = mmap.mmap(-1, slots * _WORDS * 8)  # MAP_SHARED | MAP_ANONYMOUS
        self.lock = SharedLock()
        self._acquire, self._release = self.lock.acquire, self.lock.release
        self._take = self.lock.take  # (per admission: the C function, see open_session)
        self._words = memoryview(self._map).cast("Q")
        self._floats = memoryview(self._map).cast("d")
        self._regions: dict[int, mmap.mmap] = {}
        self._warned_at = -WARN_INTERVAL
        #: Clients let in uncounted because their slots were all busy.
        self.overflows = 0

    # -- the lock -----------------------------------------------------------------------------

    def _lock(self) -> None:
        self._acquire()

    def _unlock(self) -> None:
        self._release()

    # -- slots --------------------------------------------------------------------------------

    def _find(self, key: TableKey, limits: ClientLimits, now: float) -> int:
        """The slot of ``key``, taking a free one if it has none; -1 when all are busy.

        Called with the lock held."""
        words = self._words
        start, tag, high, low = key
        mask = self._mask
        home = start & mask
        base = home * _WORDS
        if words[base + _LOW] == low and words[base + _TAG] == tag and words[base + _HIGH] == high:
            return home  # the usual answer: the key's own slot, no probe loop
        free = -1
        for probe in range(PROBES):
            slot = (start + probe) & mask
            base = slot * _WORDS
            found = words[base + _TAG]
            if found == tag and words[base + _HIGH] == high and words[base + _LOW] == low:
                return slot
            if found == 0:  # never used: the key is not further on
                if free < 0:
                    free = slot
                break
            if free < 0 and self._idle(base, limits, now):
                free = slot
        if free >= 0:
            base = free * _WORDS
            words[base + _TAG] = tag
            words[base + _HIGH] = high
            words[base + _LOW] = low
            words[base + _SESSIONS] = 0
            floats = self._floats
            floats[base + _MSG_STAMP] = floats[base + _AUTH_STAMP] = 0.0  # both full
        return free

    def _idle(self, base: int, limits: ClientLimits, now: float) -> bool:
        """No session and both buckets full again: the slot may serve another client."""
        if self._words[base + _SESSIONS]:
            return False
        floats = self._floats
        for tokens, stamp, limit in (
            (_MSG_TOKENS, _MSG_STAMP, limits.messages_per_ip),
            (_AUTH_TOKENS, _AUTH_STAMP, limits.auth_failures_per_ip),
        ):
            last = floats[base + stamp]
            if last and limit:
                level = floats[base + tokens] + (now - last) * limit / limits.interval
                if level < limit:
                    return False
        return True

    def _level(
        self, base: int, tokens: int, stamp: int, limit: int, interval: float, now: float
    ) -> float:
        """Refill a bucket to ``now``; its tokens."""
        floats = self._floats
        last = floats[base + stamp]
        level: float = float(limit)
        if last:
            refilled = floats[base + tokens] + (now - last) * limit / interval
            if refilled < limit:
                level = refilled
        floats[base + stamp] = now
        floats[base + tokens] = level
        return level

    def _overflow(self, now: float) -> None:
        self.overflows += 1
        if now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warning(
                "client limits table full around a client: it is let in uncounted "
                "(%d such clients so far in this process)",
                self.overflows,
            )

    # -- what the workers ask -----------------------------------------------------------------

    def open_session(
        self,
        key: TableKey,
        limits: ClientLimits,
        held: memoryview | None,
        closed: dict[int, int] | None = None,
        unused: dict[int, int] | None = None,
    ) -> tuple[int, bool]:
        """Count a new session of ``key``: (its slot, whether a message was leased with it).

        The slot is -1 when the session is refused, -2 when it is let in uncounted. With a
        message rate, one message is taken from the client's bucket along with the session
        (when there is one left), so that a session sending one message needs no second
        look at the table; :meth:`close_sessions` gives it back if it was not used.
        ``held``: the calling worker's region, where the session is recorded too.
        ``closed``, ``unused``: sessions that ended meanwhile, applied first (see
        :meth:`close_sessions`).
        """
        now = self._clock()
        code = self._take()  # self._acquire(), without its Python frame
        if code:
            self.lock.settle(code)
        try:
            if closed:
                self._closed(closed, held, limits, unused)
            # Per admission, inline: _find's usual answer (the key's own slot), and _level,
            # the slot's words read in one call and written in one.
            start, tag, high, low = key
            slot = start & self._mask
            found, found_high, found_low, sessions, tokens, last = _HEAD.unpack_from(
                self._map, slot * _SLOT_SIZE
            )
            if not (found_low == low and found == tag and found_high == high):
                slot = self._find(key, limits, now)
                if slot < 0:
                    self._overflow(now)
                    return -2, False
                _, _, _, sessions, tokens, last = _HEAD.unpack_from(self._map, slot * _SLOT_SIZE)
            if limits.sessions_per_ip and sessions >= limits.sessions_per_ip:
                return -1, False
            if held is not None:
                held[slot] += 1  # first: a death between the two writes over-releases none
            limit = limits.messages_per_ip
            if not limit:
                self._words[slot * _WORDS + _SESSIONS] = sessions + 1
                return slot, False
            level: float = float(limit)
            if last:
                refilled = tokens + (now - last) * limit / limits.interval
                if refilled < limit:
                    level = refilled
            leased = level >= 1  # a message leased with the session
            _COUNTS.pack_into(
                self._map, slot * _SLOT_SIZE + _SESSIONS * 8, sessions + 1, level - leased, now
            )
            return slot, leased
        finally:
            self._release()

    def close_sessions(
        self,
        closed: dict[int, int],
        held: memoryview | None,
        limits: ClientLimits,
        unused: dict[int, int] | None = None,
    ) -> None:
        """Sessions ended: ``closed`` ``{slot: sessions}``, and ``unused`` ``{slot: messages
        leased with them and not used}`` (both emptied)."""
        self._acquire()
        try:
            self._closed(closed, held, limits, unused)
        finally:
            self._release()

    def _closed(
        self,
        closed: dict[int, int],
        held: memoryview | None,
        limits: ClientLimits,
        unused: dict[int, int] | None,
    ) -> None:
        words = self._words
        for slot, sessions in closed.items():
            index = slot * _WORDS + _SESSIONS
            count = words[index]
            words[index] = count - sessions if count > sessions else 0
            if held is not None:
                count = held[slot]
                held[slot] = count - sessions if count > sessions else 0
        closed.clear()
        if unused:
            limit = float(limits.messages_per_ip)
            if limit:
                floats = self._floats
                for slot, messages in unused.items():
                    tokens = slot * _WORDS + _MSG_TOKENS
                    floats[tokens] = min(limit, floats[tokens] + messages)
            unused.clear()

    def take(self, key: TableKey, limits: ClientLimits, auth: bool = False) -> bool:
        """Take one message (or, with ``auth``, one AUTH attempt) from the client's bucket."""
        return self._take_tokens(key, limits, auth, 1) > 0

    def lease(self, key: TableKey, limits: ClientLimits, most: int) -> int:
        """Take up to ``most`` messages from the client's bucket at once (as many as are
        left, if fewer): how many were taken, 0 when none is left."""
        return self._take_tokens(key, limits, False, most)

    def _take_tokens(self, key: TableKey, limits: ClientLimits, auth: bool, most: int) -> int:
        """Up to ``most`` from a bucket; 1 when the client is not counted (no such limit, or
        no slot for it)."""
        limit = limits.auth_failures_per_ip if auth else limits.messages_per_ip
        if not limit:
            return 1
        tokens, stamp = (_AUTH_TOKENS, _AUTH_STAMP) if auth else (_MSG_TOKENS, _MSG_STAMP)
        now = self._clock()
        self._lock()
        try:
            slot = self._find(key, limits, now)
            if slot < 0:
                self._overflow(now)
                return 1  # (let through uncounted, one at a time)
            base = slot * _WORDS
            level = self._level(base, tokens, stamp, limit, limits.interval, now)
            taken = min(most, int(level))
            if taken <= 0:
                return 0
            self._floats[base + tokens] = level - taken
            return taken
        finally:
            self._unlock()

    def give_back_auth(self, key: TableKey, limits: ClientLimits) -> None:
        """A successful AUTH does not count."""
        limit = limits.auth_failures_per_ip
        if not limit:
            return
        now = self._clock()
        self._lock()
        try:
            slot = self._find(key, limits, now)
            if slot >= 0:
                base = slot * _WORDS
                level = self._level(base, _AUTH_TOKENS, _AUTH_STAMP, limit, limits.interval, now)
                self._floats[base + _AUTH_TOKENS] = min(float(limit), level + 1)
        finally:
            self._unlock()

    # -- what the supervisor does -------------------------------------------------------------

    def new_region(self) -> mmap.mmap:
        """A worker's region of held sessions (map it before the fork; see :meth:`adopt`)."""
        return mmap.mmap(-1, self.slots * 4)

    def adopt(self, pid: int, region: mmap.mmap) -> None:
        """``region`` belongs to worker ``pid`` (just forked)."""
        self._regions[pid] = region

    def forget_regions(self, keep: mmap.mmap | None = None) -> None:
        """In a worker: unmap the other workers' regions, inherited with the fork."""
        for region in self._regions.values():
            if region is not keep:
                region.close()
        self._regions = {}

    def worker_gone(self, pid: int) -> int:
        """Worker ``pid`` exited: give back the sessions it still held. Returns how many."""
        region = self._regions.pop(pid, None)
        if region is None:
            return 0
        held = memoryview(region).cast("I")
        given = 0
        self._lock()
        try:
            words = self._words
            for slot, count in enumerate(held.tolist()):
                if count:
                    index = slot * _WORDS + _SESSIONS
                    words[index] = max(0, words[index] - count)
                    given += count
        finally:
            self._unlock()
            held.release()
            region.close()
        return given

    def sessions(self, key: str) -> int:
        """The sessions counted for a limiter key now (for tests and checks)."""
        found = self._lookup(table_key(key))
        return self._words[found * _WORDS + _SESSIONS] if found >= 0 else 0

    def _lookup(self, key: TableKey) -> int:
        start, tag, high, low = key
        words = self._words
        for probe in range(PROBES):
            slot = (start + probe) & self._mask
            base = slot * _WORDS
            found = words[base + _TAG]
            if found == 0:
                return -1
            if found == tag and words[base + _HIGH] == high and words[base + _LOW] == low:
                return slot
        return -1


class _TableKeys(dict[str, TableKey]):
    """The table keys of limiter keys, worked out at the first lookup of each."""

    def __missing__(self, key: str) -> TableKey:
        if len(self) >= KEY_CACHE:
            self.clear()
        found = self[key] = table_key(key)
        return found


class SharedLimiter(Limiter):
    """A worker's ``limiter``: the engine's questions, answered from the shared table.

    ``held`` is this worker's region (see :class:`AnvilTable`); None outside a farm worker.
    """

    def __init__(
        self, limits: ClientLimits, table: AnvilTable, held: mmap.mmap | None = None
    ) -> None:
        super().__init__(limits)
        self.table = table
        self._held = memoryview(held).cast("I") if held is not None else None
        #: Limiter key -> table key (a plain dict lookup once known: no Python call).
        self._table_keys = _TableKeys()
        #: This worker's sessions per key: [the slot that counts them, open sessions,
        #: messages leased for them and not used yet].
        self._mine: dict[str, list[int]] = {}
        #: Sessions closed but not yet taken off the table: {slot: sessions}, and the messages
        #: leased with them and not used: {slot: messages} (see AnvilTable.open_session).
        self._closed: dict[int, int] = {}
        self._unused: dict[int, int] = {}
        self._flush_timer: asyncio.TimerHandle | None = None

    def _limits_changed(self, limits: ClientLimits) -> None:
        #: Messages a session's MAIL takes from the table at a time, when its lease is used
        #: up: one look at the table per this many messages of a long session (the rest comes
        #: back when it ends). An eighth of the rate, at most MESSAGE_LEASE, at least one.
        self._lease = min(MESSAGE_LEASE, max(1, limits.messages_per_ip // 8))

    # The table answers at once: plain methods, no coroutine (farm.smtp.limiter's Answer).

    def open_session(self, key: str) -> bool:
        slot, leased = self.table.open_session(
            self._table_keys[key], self._limits, self._held, self._closed, self._unused
        )
        if slot < 0:
            return slot != -1  # -1: refused; -2: let in uncounted
        mine = self._mine.get(key)
        if mine is None:
            self._mine[key] = [slot, 1, 1 if leased else 0]
        else:
            mine[0] = slot
            mine[1] += 1
            if leased:
                mine[2] += 1
        return True

    def close_session(self, key: str) -> None:
        """Noted here, and applied to the table with the next admission or within
        :data:`CLOSE_DELAY` (one lock for both, instead of one each)."""
        mine = self._mine.get(key)
        if mine is None:
            return  # let in uncounted
        slot, still_open, leased = mine
        still_open -= 1
        closed = self._closed
        closed[slot] = closed.get(slot, 0) + 1
        kept = still_open * self._lease  # at most a lease per open session: the rest goes back
        if leased > kept:
            unused = self._unused
            unused[slot] = unused.get(slot, 0) + leased - kept
            leased = kept
        if still_open > 0:
            mine[1] = still_open
            mine[2] = leased
        else:
            del self._mine[key]
        if self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_timer = loop.call_later(CLOSE_DELAY, self.flush)

    def flush(self) -> None:
        """Apply the sessions closed since the last admission to the table now."""
        self._flush_timer = None
        if self._closed:
            self.table.close_sessions(self._closed, self._held, self._limits, self._unused)

    def count_message(self, key: str) -> bool:
        mine = self._mine.get(key)
        if mine is None:  # (no session of this worker holds the key: one message)
            return self.table.take(self._table_keys[key], self._limits)
        if mine[2] > 0:  # a message leased for the key's sessions
            mine[2] -= 1
            return True
        taken = self.table.lease(self._table_keys[key], self._limits, self._lease)
        if taken <= 0:
            return False
        mine[2] = taken - 1
        return True

    def auth_allowed(self, key: str) -> bool:
        return self.table.take(self._table_keys[key], self.limits, auth=True)

    def auth_succeeded(self, key: str) -> None:
        self.table.give_back_auth(self._table_keys[key], self.limits)
