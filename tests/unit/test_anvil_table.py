"""The farm's shared table of per-client counters (farm.supervisor.anvil): the same arithmetic
as the in-process Anvil, across real forked processes, robust to a process killed at any point.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from farm.limits import ClientLimits
from farm.supervisor.anvil import PROBES, AnvilTable, SharedLimiter, table_key
from tests.support.clock import FakeClock


def limiter(table: AnvilTable, **limits: object) -> SharedLimiter:
    return SharedLimiter(ClientLimits(exempt_networks=(), **limits), table, table.new_region())


def ask(answer: object) -> bool:
    """One of the limiter's answers: the shared table answers at once, never an awaitable."""
    assert isinstance(answer, bool), answer
    return answer


def test_sessions_are_counted_and_given_back() -> None:
    table = AnvilTable()
    one = limiter(table, sessions_per_ip=2)
    assert ask(one.open_session("192.0.2.1"))
    assert ask(one.open_session("192.0.2.1"))
    assert not ask(one.open_session("192.0.2.1"))
    assert ask(one.open_session("192.0.2.2"))  # another client is not affected
    assert table.sessions("192.0.2.1") == 2
    one.close_session("192.0.2.1")
    assert ask(one.open_session("192.0.2.1"))
    for _ in range(5):  # more closes than opens never go below zero
        one.close_session("192.0.2.1")
    assert table.sessions("192.0.2.1") == 0


def test_message_and_auth_buckets() -> None:
    clock = FakeClock()
    table = AnvilTable(clock=clock)
    one = limiter(table, messages_per_ip=3, auth_failures_per_ip=2, interval=60.0)
    assert [ask(one.count_message("192.0.2.1")) for _ in range(4)] == [True] * 3 + [False]
    clock.now += 20  # one message per 20 s comes back
    assert [ask(one.count_message("192.0.2.1")) for _ in range(2)] == [True, False]
    assert ask(one.auth_allowed("192.0.2.1"))
    one.auth_succeeded("192.0.2.1")  # a success gives its attempt back
    assert [ask(one.auth_allowed("192.0.2.1")) for _ in range(3)] == [True, True, False]


def test_an_idle_client_frees_its_slot_for_another() -> None:
    clock = FakeClock()
    table = AnvilTable(slots=PROBES, clock=clock)  # as small as it gets: every key collides
    one = limiter(table, sessions_per_ip=5, messages_per_ip=1, interval=10.0)
    keys = [f"192.0.2.{n}" for n in range(PROBES)]
    for key in keys:
        assert ask(one.open_session(key))
    assert table.overflows == 0
    # Full: a new client is let in uncounted (never refused for our bookkeeping).
    assert ask(one.open_session("198.51.100.1"))
    assert table.overflows == 1
    one.close_session("198.51.100.1")  # (uncounted: nothing to give back)
    # A client that left, but whose message bucket is still refilling, keeps its slot...
    assert ask(one.count_message(keys[0]))
    one.close_session(keys[0])
    assert ask(one.open_session("198.51.100.2"))
    assert table.overflows == 2
    # ... until it has refilled: then the slot serves another client.
    clock.now += 10
    assert ask(one.open_session("198.51.100.3"))
    assert table.overflows == 2
    assert table.sessions("198.51.100.3") == 1


def test_a_dead_workers_sessions_are_given_back() -> None:
    table = AnvilTable()
    region = table.new_region()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: a worker that dies holding 3 sessions
        code = 1
        try:
            worker = SharedLimiter(ClientLimits(exempt_networks=()), table, region)
            code = 0 if all(ask(worker.open_session("192.0.2.9")) for _ in range(3)) else 1
        finally:
            os._exit(code)
    table.adopt(pid, region)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.sessions("192.0.2.9") == 3
    assert table.worker_gone(pid) == 3
    assert table.sessions("192.0.2.9") == 0


def test_a_process_killed_holding_the_lock_does_not_wedge_the_table() -> None:
    table = AnvilTable()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child takes the lock and never lets go
        table._lock()
        os.write(ready_w, b"x")
        signal.pause()
        os._exit(0)
    assert os.read(ready_r, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    one = limiter(table, sessions_per_ip=1)
    assert ask(one.open_session("192.0.2.1"))  # the kernel released the dead process's lock
    os.close(ready_r)
    os.close(ready_w)


def test_keys() -> None:
    assert table_key("2001:db8::/64")[1:] == (6 | 64 << 8, 0x20010DB800000000, 0)
    assert table_key("192.0.2.1")[1:] == (4, 0, 0xC0000201)
    with pytest.raises(ValueError):
        AnvilTable(slots=100)


def test_a_message_leased_with_a_session_comes_back_unused() -> None:
    table = AnvilTable(clock=FakeClock())
    first, second = (limiter(table, messages_per_ip=2, interval=60.0) for _ in range(2))
    assert ask(first.open_session("192.0.2.1"))  # leases one of the 2 messages
    assert ask(second.open_session("192.0.2.1"))  # (another worker) leases the other
    assert ask(first.count_message("192.0.2.1"))  # its lease: no table access
    assert not ask(first.count_message("192.0.2.1"))  # none left anywhere
    second.close_session("192.0.2.1")  # never sent one: its lease goes back
    assert ask(first.count_message("192.0.2.1"))
    assert not ask(first.count_message("192.0.2.1"))


def test_a_long_session_leases_messages_and_gives_back_what_it_did_not_use() -> None:
    """Past the message leased with its session, a session's MAILs take MESSAGE_LEASE
    messages at a time (an eighth of the rate here); what it leaves unused comes back."""
    key = "192.0.2.1"
    table = AnvilTable(clock=FakeClock())  # (no refill while the test runs)
    first, second = (limiter(table, messages_per_ip=64, interval=3600.0) for _ in range(2))
    assert ask(first.open_session(key))  # leases 1: 63 left in the table
    assert ask(first.count_message(key))  # its lease
    assert ask(first.count_message(key))  # leases 8: 55 left, 7 held by `first`
    assert ask(second.open_session(key))  # (another worker) leases 1: 54 left
    assert sum(ask(second.count_message(key)) for _ in range(60)) == 55  # 1 + 54, no more
    first.close_session(key)  # its 7 unused come back (no event loop: at once)
    assert sum(ask(second.count_message(key)) for _ in range(10)) == 7


def test_a_small_rate_is_leased_one_message_at_a_time() -> None:
    key = "192.0.2.1"
    table = AnvilTable(clock=FakeClock())
    first, second = (limiter(table, messages_per_ip=4, interval=3600.0) for _ in range(2))
    assert ask(first.open_session(key)) and ask(second.open_session(key))  # 1 each: 2 left
    assert ask(first.count_message(key)) and ask(first.count_message(key))  # its own, then 1
    assert ask(second.count_message(key)) and ask(second.count_message(key))  # the same
    assert not ask(first.count_message(key)) and not ask(second.count_message(key))


@pytest.mark.parametrize("kind", ["mutex", "fcntl"])
def test_the_lock_survives_its_holder_killed(kind: str) -> None:
    from farm.supervisor.shared_lock import SharedLock

    lock = SharedLock()
    if kind == "fcntl":
        lock._init_fcntl()  # the fallback, where no robust mutex is available
    assert lock.kind == kind
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child takes the lock and is killed holding it
        lock.acquire()
        os.write(ready_w, b"x")
        signal.pause()
        os._exit(0)
    assert os.read(ready_r, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    for _ in range(2):  # taken at once, and again after a release
        lock.acquire()
        lock.release()
    os.close(ready_r)
    os.close(ready_w)


@pytest.mark.parametrize("kind", ["mutex", "fcntl"])
def test_a_busy_lock_is_waited_for_without_holding_the_gil(kind: str) -> None:
    """Held by another process: a thread asking for it waits (the mutex's quick try fails,
    then the wait releases the GIL: this test's own thread goes on meanwhile), and has it
    once the holder lets go."""
    import threading

    from farm.supervisor.shared_lock import SharedLock

    lock = SharedLock()
    if kind == "fcntl":
        lock._init_fcntl()
    held_r, held_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child holds the lock until told to let go
        lock.acquire()
        os.write(held_w, b"x")
        os.read(go_r, 1)
        lock.release()
        os._exit(0)
    try:
        assert os.read(held_r, 1) == b"x"
        got = threading.Event()

        def waiter() -> None:
            lock.acquire()
            got.set()
            lock.release()

        thread = threading.Thread(target=waiter)
        thread.start()
        assert not got.wait(0.3)  # (this thread runs: the waiter does not hold the GIL)
        os.write(go_w, b"x")
        thread.join(60)
        assert got.is_set()
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        for fd in (held_r, held_w, go_r, go_w):
            os.close(fd)


def test_closed_sessions_reach_the_table_with_the_next_admission_or_soon() -> None:
    from farm.supervisor.anvil import CLOSE_DELAY

    table = AnvilTable()
    one = limiter(table, sessions_per_ip=1)

    async def scenario() -> list[int]:
        seen = []
        assert one.open_session("192.0.2.1")
        one.close_session("192.0.2.1")  # noted, not applied yet: the count is higher, not lower
        seen.append(table.sessions("192.0.2.1"))
        assert one.open_session("192.0.2.1")  # applied first, under the same lock
        seen.append(table.sessions("192.0.2.1"))
        one.close_session("192.0.2.1")
        await asyncio.sleep(CLOSE_DELAY * 4)  # no admission: the timer applies it
        seen.append(table.sessions("192.0.2.1"))
        return seen

    assert asyncio.run(scenario()) == [1, 1, 0]


def test_sessions_without_a_usable_proxy_source_share_the_unknown_key() -> None:
    table = AnvilTable()
    one = limiter(table, sessions_per_ip=2)
    assert ask(one.open_session("unknown"))
    assert ask(one.open_session("unknown"))
    assert not ask(one.open_session("unknown"))
    assert ask(one.open_session("0.0.0.0"))  # not the same counter as any address
    assert table.sessions("unknown") == 2
    one.close_session("unknown")
    assert ask(one.open_session("unknown"))
