"""Which deadline a session faces next, for a given ``now`` (sans-I/O: the clock is passed in).

A session has one timer. When it fires, :func:`next_deadline` says what has expired (the
asyncio protocol then acts: 421 idle timeout, 451 for a hung hook, abort for a client that
does not read), or when to look again. The rules:

- idle: ``timeout`` seconds after the client's last line (or the end of our last task);
- a command or delivery task (a handler hook) may run ``timeout`` seconds;
- inside a DATA/BDAT body, the data deadline: ``timeout`` from the body's start, moved on
  by ``len(octets) / min_data_rate`` as octets arrive, never past ``timeout`` from now
  (:func:`extended_data_deadline`);
- a client that leaves our replies unread (writes paused) is dropped after the write stall
  limit, or the idle ``timeout`` when that is shorter (:func:`write_stall`). Without a
  ``timeout``, this is the only timed rule.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from farm.smtp.state import ConnectionState, Phase


class Expired(enum.IntEnum):
    """What a session's timer found."""

    #: Nothing yet: look again at :attr:`Deadline.at` (None: no timer needed).
    NOTHING = 0
    #: The client has not read our replies for the write stall limit: abort the connection.
    WRITE_STALL = 1
    #: A handler hook ran longer than ``timeout``: cancel it, 451 and close.
    HOOK = 2
    #: The client was silent (or its body too slow) for ``timeout``: 421 and close.
    IDLE = 3


class Deadline(NamedTuple):
    expired: Expired
    #: When to look again (only with :attr:`Expired.NOTHING`; None: no timer).
    at: float | None = None


NO_TIMER = Deadline(Expired.NOTHING)


def write_stall(write_stall_limit: float, timeout: float | None) -> float:
    """Seconds a client may leave our replies unread: the stall limit, or ``timeout`` if
    shorter."""
    return min(write_stall_limit, timeout or write_stall_limit)


def extended_data_deadline(
    deadline: float, now: float, timeout: float, octets: int, min_data_rate: float
) -> float:
    """The data deadline once ``octets`` more arrived: ``octets / min_data_rate`` seconds
    later, but never past ``timeout`` from ``now``."""
    return min(now + timeout, deadline + octets / min_data_rate)


def next_deadline(
    state: ConnectionState,
    now: float,
    timeout: float | None,
    write_stall_limit: float,
    task_running: bool,
    in_body: bool,
) -> Deadline:
    """What has expired at ``now``, or when the timer must look again.

    ``timeout``: the idle timeout (None or 0: none); ``task_running``: a command or delivery
    task runs (since ``state.task_started``); ``in_body``: a DATA/BDAT body is being read.
    """
    stall = write_stall(write_stall_limit, timeout) if state.write_paused else 0.0
    if state.write_paused and now >= state.write_paused_at + stall:
        return Deadline(Expired.WRITE_STALL)
    if not timeout:  # only the write stall is timed
        return (
            Deadline(Expired.NOTHING, state.write_paused_at + stall)
            if state.write_paused
            else NO_TIMER
        )
    if task_running:
        deadline = state.task_started + timeout
        if now >= deadline:
            return Deadline(Expired.HOOK)
    elif in_body:
        deadline = state.data_deadline
    else:
        deadline = state.last_line + timeout
    if now >= deadline:
        return Deadline(Expired.IDLE)
    if state.write_paused:
        deadline = min(deadline, state.write_paused_at + stall)
    return Deadline(Expired.NOTHING, deadline)


def timer_on_write_pause(
    state: ConnectionState, timer_at: float | None, timeout: float | None, write_stall_limit: float
) -> float | None:
    """Writes just paused (``state.write_paused_at``): when the session's timer must fire
    now, or None to leave it as it is (``timer_at``: when it fires; None: no timer).

    The stall deadline replaces a later timer; without an idle ``timeout`` a greeted session
    has no timer, so it gets one (before the greeting, the greeting arms the timer).
    """
    stall_at = state.write_paused_at + write_stall(write_stall_limit, timeout)
    if timer_at is None:
        return stall_at if not timeout and state.phase is Phase.GREETED else None
    return stall_at if timer_at > stall_at else None
