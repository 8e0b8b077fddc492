"""Postfix's error limits as decisions (farm.smtp.error_limits.ErrorLimits), without a socket:
which replies count, when the delay starts and grows, when the session must end."""

from __future__ import annotations

from typing import Any

import pytest

from farm.smtp.error_limits import ERROR_DELAY_MAX, ErrorLimits, any_limit


def _replies(limits: ErrorLimits, codes: list[str]) -> list[tuple[bool, float]]:
    """Each reply as the answer to its own command: (session over?, delay due after it)."""
    return [(limits.count_reply(f"{code} text", n), limits.delay) for n, code in enumerate(codes)]


@pytest.mark.parametrize(
    ("code", "errors", "junk"),
    [
        ("250", 0, 0),
        ("221", 0, 0),
        ("354", 0, 0),
        ("500", 1, 0),
        ("501", 1, 0),
        ("550", 1, 0),
        ("450", 1, 0),
        ("421", 0, 0),  # the session ends anyway: not an error of the client's
        ("452", 0, 1),  # flow control: a junk command, not an error
    ],
)
def test_which_replies_count(code: str, errors: int, junk: int) -> None:
    limits = ErrorLimits(soft=10, hard=20, junk=100, sleep_time=1)
    assert limits.count_reply(f"{code} x", 1) is False
    assert (limits.errors, limits.junk) == (errors, junk)


def test_one_error_per_command_however_many_replies() -> None:
    limits = ErrorLimits(soft=0, hard=2, junk=0, sleep_time=1)
    assert [limits.count_reply("550 no", 7) for _ in range(5)] == [False] * 5
    assert limits.errors == 1
    assert limits.count_reply("550 no", 8) is True


@pytest.mark.parametrize(
    ("soft", "hard", "sleep", "codes", "expected"),
    [
        # hard limit 3: the third error ends the session, no delay then
        (0, 3, 1.0, ["500", "500", "500"], [(False, 0), (False, 0), (True, 0)]),
        # soft limit 1: each error past it adds sleep_time
        (1, 0, 1.0, ["500", "500", "500"], [(False, 0), (False, 1), (False, 2)]),
        (1, 0, 0.5, ["500", "250", "500"], [(False, 0), (False, 0), (False, 0.5)]),
        # successes do not forgive; the delay stays due until taken
        (1, 0, 2.0, ["500", "500", "250"], [(False, 0), (False, 2), (False, 2)]),
        # the delay is capped
        (
            1,
            0,
            6.0,
            ["500", "500", "500", "500"],
            [(False, 0), (False, 6), (False, 10), (False, 10)],
        ),
        # both: delays until the hard limit, none once it is reached
        (1, 3, 1.0, ["500", "500", "500"], [(False, 0), (False, 1), (True, 0)]),
        (0, 0, 1.0, ["500"] * 30, [(False, 0)] * 30),
    ],
)
def test_soft_and_hard_limits(
    soft: int, hard: int, sleep: float, codes: list[str], expected: list[tuple[bool, float]]
) -> None:
    assert _replies(ErrorLimits(soft, hard, 0, sleep), codes) == expected
    assert ERROR_DELAY_MAX == 10.0


@pytest.mark.parametrize(
    ("junk_limit", "hard", "commands", "over_at", "errors"),
    [
        (0, 1, 50, None, 0),  # no junk limit: junk is free
        (3, 0, 5, None, 2),  # past the junk limit each one is an error
        (3, 2, 5, 5, 2),  # ...and the second of those reaches the hard limit
        (1, 1, 2, 2, 1),
    ],
)
def test_junk_commands(
    junk_limit: int, hard: int, commands: int, over_at: int | None, errors: int
) -> None:
    limits = ErrorLimits(soft=0, hard=hard, junk=junk_limit, sleep_time=1)
    over = [n for n in range(1, commands + 1) if limits.count_junk(n)]
    assert over == ([] if over_at is None else [over_at])
    assert limits.errors == errors


def test_a_452_counts_as_junk_and_can_end_the_session() -> None:
    limits = ErrorLimits(soft=0, hard=1, junk=1, sleep_time=1)
    assert limits.count_reply("452 4.5.3 too many recipients", 1) is False
    assert limits.count_reply("452 4.5.3 too many recipients", 2) is True


def test_an_accepted_message_forgives() -> None:
    limits = ErrorLimits(soft=1, hard=0, junk=2, sleep_time=1)
    _replies(limits, ["500", "500", "452"])
    assert (limits.errors, limits.junk, limits.delay) == (2, 1, 1.0)
    limits.forgive()
    assert (limits.errors, limits.junk, limits.delay) == (0, 0, 0.0)


def test_a_delay_is_taken_once() -> None:
    limits = ErrorLimits(soft=1, hard=0, junk=0, sleep_time=3)
    _replies(limits, ["500", "500"])
    assert limits.take_delay() == 3.0
    assert limits.take_delay() == 0.0


@pytest.mark.parametrize(
    ("soft", "hard", "junk", "on"), [(0, 0, 0, False), (1, 0, 0, True), (0, 0, 5, True)]
)
def test_any_limit(soft: int, hard: int, junk: int, on: bool) -> None:
    assert any_limit(soft, hard, junk) is on


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"soft": -1}, "soft_error_limit must be an integer >= 0"),
        ({"hard": True}, "hard_error_limit must be an integer >= 0"),
        ({"junk": 1.5}, "junk_command_limit must be an integer >= 0"),
        ({"sleep_time": -1}, "error_sleep_time must be a number >= 0"),
        ({"sleep_time": float("nan")}, "error_sleep_time must be a number >= 0"),
    ],
)
def test_bad_settings_are_refused(keywords: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"soft": 1, "hard": 1, "junk": 1, "sleep_time": 1} | keywords
    with pytest.raises(ValueError, match=message):
        ErrorLimits(**settings)


def test_no_sleep_time_is_no_delay() -> None:
    limits = ErrorLimits(soft=1, hard=0, junk=0, sleep_time=None)
    _replies(limits, ["500", "500"])
    assert limits.delay == 0.0


def test_fresh_limits_keep_the_settings_and_drop_the_counts() -> None:
    used = ErrorLimits(soft=1, hard=3, junk=2, sleep_time=0.5)
    for command in range(2):
        used.count_reply("500 no", command)
    assert used.errors == 2 and used.delay == 0.5
    fresh = used.fresh()
    assert (fresh.soft, fresh.hard, fresh.junk_limit, fresh.sleep_time) == (1, 3, 2, 0.5)
    assert (fresh.errors, fresh.junk, fresh.error_at, fresh.delay) == (0, 0, -1, 0.0)
    assert [fresh.count_reply("500 no", c) for c in range(3)] == [False, False, True]
    assert used.errors == 2  # the copy counts on its own
