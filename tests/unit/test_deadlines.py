"""Which deadline a session faces next (farm.smtp.deadlines), on a fake clock: plain numbers.

These replace the wall-clock tests that slept through idle periods; one real-socket test per
timeout kind stays in tests/engine (idle after the greeting, idle inside DATA, a hung hook,
the write stall) to prove the wiring.
"""

from __future__ import annotations

import pytest

from farm.smtp.deadlines import (
    NO_TIMER,
    Deadline,
    Expired,
    extended_data_deadline,
    next_deadline,
    timer_on_write_pause,
    write_stall,
)
from farm.smtp.state import ConnectionState, Phase

NOTHING, STALL, HOOK, IDLE = Expired.NOTHING, Expired.WRITE_STALL, Expired.HOOK, Expired.IDLE


def decide(
    state: ConnectionState,
    now: float,
    timeout: float | None = 10.0,
    stall_limit: float = 60.0,
    task: bool = False,
    body: bool = False,
) -> Deadline:
    return next_deadline(state, now, timeout, stall_limit, task, body)


# -- idle ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (100.0, Deadline(NOTHING, 110.0)),  # the greeting at 100: idle until 110
        (109.99, Deadline(NOTHING, 110.0)),
        (110.0, Deadline(IDLE)),
        (500.0, Deadline(IDLE)),
    ],
)
def test_idle_after_the_greeting(now: float, expected: Deadline) -> None:
    assert decide(ConnectionState(last_line=100.0), now) == expected


def expires_at(state: ConnectionState, lines: list[float], timeout: float) -> float | None:
    """Drive the timer as SMTP does, from 0 on: the client's lines arrive at the given times,
    the timer fires at the time it asked for; the time the session expired (None: never)."""
    at = decide(state, 0.0, timeout).at
    pending = sorted(lines)
    while at is not None:
        if pending and pending[0] < at:
            state.last_line = pending.pop(0)  # a line arrives (SMTP._on_command)
            continue
        verdict = decide(state, at, timeout)
        if verdict.expired is not NOTHING:
            return at
        at = verdict.at
    return None


def test_idle_clock_restarts_on_each_line() -> None:
    """A NOOP every half timeout keeps a session alive past twice the timeout, and the
    timeout runs from the last one (this replaces test_hostile's
    test_idle_timeout_restarts_on_each_line, which slept 2 s)."""
    state = ConnectionState(last_line=0.0)
    assert expires_at(state, [0.5, 1.0, 1.5, 2.0], timeout=1.0) == 3.0
    assert expires_at(ConnectionState(last_line=0.0), [], timeout=1.0) == 1.0


def test_idle_clock_restarts_after_a_message() -> None:
    """Silence after the terminator counts from the end of the message, not from DATA (this
    replaces test_hostile's test_idle_timer_restarts_after_data, which slept 3.5 s)."""
    timeout = 3.0
    state = ConnectionState(last_line=10.0, data_deadline=10.0 + timeout)  # DATA at 10
    # 2 s of pause inside the body (shorter than the timeout), then the body at 12:
    assert decide(state, 12.0, timeout, body=True) == Deadline(NOTHING, 13.0)
    state.data_deadline = extended_data_deadline(state.data_deadline, 12.0, timeout, 30, 1024.0)
    state.last_line = 12.0  # the message's end (SMTP._on_message)
    # 1.5 s of silence after it: beyond 3 s after DATA, yet within the timeout of the end.
    assert decide(state, 13.5, timeout) == Deadline(NOTHING, 15.0)
    assert decide(state, 15.0, timeout) == Deadline(IDLE)


def test_no_timeout_no_timer() -> None:
    for timeout in (None, 0.0):
        assert decide(ConnectionState(last_line=1.0), 1e9, timeout) == NO_TIMER
        assert decide(ConnectionState(), 1e9, timeout, task=True, body=True) == NO_TIMER


# -- a hook that hangs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (50.0, Deadline(NOTHING, 60.0)),
        (59.0, Deadline(NOTHING, 60.0)),
        (60.0, Deadline(HOOK)),
    ],
)
def test_a_task_may_run_for_the_timeout(now: float, expected: Deadline) -> None:
    # The client's last line was long ago: while a task runs, only the task's clock counts.
    state = ConnectionState(last_line=0.0, task_started=50.0)
    assert decide(state, now, task=True) == expected


def test_a_task_during_a_body_is_timed_as_a_task() -> None:
    state = ConnectionState(task_started=50.0, data_deadline=51.0)
    assert decide(state, 55.0, task=True, body=True) == Deadline(NOTHING, 60.0)


# -- DATA and min_data_rate ----------------------------------------------------------------------


def test_a_body_has_the_timeout_from_its_start() -> None:
    """(The real-socket twin is test_hostile's test_idle_timeout_after_354.)"""
    state = ConnectionState(last_line=100.0, data_deadline=101.0)  # DATA at 100, timeout 1
    assert decide(state, 100.5, timeout=1.0, body=True) == Deadline(NOTHING, 101.0)
    assert decide(state, 101.0, timeout=1.0, body=True) == Deadline(IDLE)


@pytest.mark.parametrize(
    ("deadline", "now", "octets", "expected"),
    [
        (110.0, 101.0, 1000, 111.0),  # 1000 octets at 1000 o/s: one more second
        (110.0, 101.0, 500, 110.5),
        (110.0, 101.0, 0, 110.0),
        (110.0, 101.0, 100_000, 111.0),  # never past timeout (10 s) from now
        (110.0, 109.0, 100_000, 119.0),
    ],
)
def test_min_data_rate_moves_the_body_deadline(
    deadline: float, now: float, octets: int, expected: float
) -> None:
    assert extended_data_deadline(deadline, now, 10.0, octets, 1000.0) == expected


def test_a_trickling_body_times_out() -> None:
    """A slowloris body: one octet a second against a 1000 o/s minimum ends at the timeout
    from its start (plus its 10 ms of credit)."""
    state = ConnectionState(data_deadline=10.0)  # DATA at 0, timeout 10
    now = 0.0
    while decide(state, now, body=True).expired is NOTHING:
        now += 1.0
        state.data_deadline = extended_data_deadline(state.data_deadline, now, 10.0, 1, 1000.0)
    assert now == 11.0  # deadline 10.011 at 11: over


def test_a_body_at_the_minimum_rate_never_times_out() -> None:
    state = ConnectionState(data_deadline=10.0)
    for second in range(1, 1000):
        state.data_deadline = extended_data_deadline(
            state.data_deadline, float(second), 10.0, 1000, 1000.0
        )
        assert decide(state, float(second), body=True).expired is NOTHING


# -- write stall ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "timeout", "expected"),
    [(60.0, None, 60.0), (60.0, 0.0, 60.0), (60.0, 300.0, 60.0), (60.0, 1.0, 1.0)],
)
def test_write_stall_is_the_shorter_of_limit_and_timeout(
    limit: float, timeout: float | None, expected: float
) -> None:
    assert write_stall(limit, timeout) == expected


def test_a_client_that_never_reads_is_dropped_at_the_idle_timeout_when_shorter() -> None:
    """(This replaces test_hostile's test_non_reading_client_dropped_at_timeout; the stall
    limit's real-socket test stays in test_engine_hardening.)"""
    state = ConnectionState(last_line=0.0, write_paused=True, write_paused_at=0.2)
    # A pipelined flood keeps the client's lines fresh, yet its replies stay unread:
    state.last_line = 1.1
    assert decide(state, 1.1, timeout=1.0) == Deadline(NOTHING, 1.2)
    assert decide(state, 1.2, timeout=1.0) == Deadline(STALL)


def test_the_stall_comes_before_the_idle_deadline() -> None:
    state = ConnectionState(last_line=100.0, write_paused=True, write_paused_at=101.0)
    assert decide(state, 102.0, timeout=300.0) == Deadline(NOTHING, 161.0)
    assert decide(state, 161.0, timeout=300.0) == Deadline(STALL)
    # and before a hung hook's
    assert decide(state, 161.0, timeout=300.0, task=True) == Deadline(STALL)


def test_without_a_timeout_only_the_stall_is_timed() -> None:
    paused = ConnectionState(write_paused=True, write_paused_at=5.0)
    assert decide(paused, 6.0, timeout=None) == Deadline(NOTHING, 65.0)
    assert decide(paused, 65.0, timeout=None) == Deadline(STALL)
    resumed = ConnectionState(write_paused=False, write_paused_at=5.0)
    assert decide(resumed, 65.0, timeout=None) == NO_TIMER


def test_resumed_writes_end_the_stall_clock() -> None:
    state = ConnectionState(last_line=100.0, write_paused=False, write_paused_at=0.0)
    assert decide(state, 105.0) == Deadline(NOTHING, 110.0)


#: (greeted, timer fires at, timeout) -> when the timer must fire now (None: leave it);
#: writes paused at 100, stall limit 60.
ON_PAUSE = [
    (True, 400.0, 300.0, 160.0),  # the idle timer fires later: the stall comes first
    (True, 130.0, 300.0, None),  # it fires sooner (an older line): it looks again then
    (True, 400.0, 10.0, 110.0),  # the stall is the timeout when shorter
    (True, None, None, 160.0),  # no idle timeout, no timer: one for the stall
    (True, None, 0.0, 160.0),
    (False, None, None, None),  # before the greeting: the greeting arms the timer
    (True, None, 300.0, None),  # a timeout but no timer: closing, nothing to time
]


@pytest.mark.parametrize(("greeted", "timer_at", "timeout", "expected"), ON_PAUSE)
def test_the_timer_when_writes_pause(
    greeted: bool, timer_at: float | None, timeout: float | None, expected: float | None
) -> None:
    phase = Phase.GREETED if greeted else Phase.CONNECTED
    state = ConnectionState(phase=phase, write_paused=True, write_paused_at=100.0)
    assert timer_on_write_pause(state, timer_at, timeout, 60.0) == expected
