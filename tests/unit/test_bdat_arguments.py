"""BDAT (RFC 3030) argument parsing and chunk refusals (farm.smtp.chunking), without a socket."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from farm.smtp.body import INSUFFICIENT_STORAGE
from farm.smtp.chunking import (
    TOO_MUCH_DATA,
    BdatArguments,
    chunk_accepted,
    chunk_refusal,
    chunk_size_to_skip,
    parse_bdat,
)
from farm.smtp.state import HELO_FIRST, NEED_RCPT


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("0", (0, False)),
        ("1000", (1000, False)),
        ("1000 LAST", (1000, True)),
        ("1000 last", (1000, True)),
        ("1000 LaSt", (1000, True)),
        ("0 LAST", (0, True)),
        ("  42   LAST  ", (42, True)),
        ("007", (7, False)),
        ("99999999999999999999", (99999999999999999999, False)),
        # no valid size, or a wrong second word: a syntax error
        (None, None),
        ("", None),
        ("   ", None),
        ("LAST", None),
        ("-1", None),
        ("+5", None),
        ("1e3", None),
        ("1.5", None),
        ("0x10", None),
        ("\u0661\u0662", None),  # Arabic-Indic digits: digits, but not ASCII
        ("\u00b2", None),  # superscript two
        ("10 LAST extra", None),
        ("10 FIRST", None),
        ("10 LASTING", None),
        ("10 20", None),
    ],
)
def test_parse_bdat(arg: str | None, expected: tuple[int, bool] | None) -> None:
    parsed = parse_bdat(arg)
    assert parsed == (None if expected is None else BdatArguments(*expected))


@pytest.mark.parametrize(
    ("arg", "size"),
    [
        ("10", 10),
        ("10 LAST", 10),
        ("10 ANYTHING", 10),  # only the size matters for skipping the octets
        ("0", 0),
        (None, None),
        ("", None),
        ("x", None),
        ("-3", None),
        ("10 LAST more", None),
    ],
)
def test_chunk_size_to_skip(arg: str | None, size: int | None) -> None:
    assert chunk_size_to_skip(arg) == size


def _no() -> bool:
    return False


def _full() -> bool:
    return True


def _must_not_be_asked() -> bool:
    raise AssertionError("the memory budget was looked at")


@pytest.mark.parametrize(
    ("order", "received", "size", "limit", "room", "reply"),
    [
        (None, None, 100, 1000, _no, None),
        (None, 900, 100, 1000, _must_not_be_asked, None),  # exactly at the limit
        (None, 901, 100, 1000, _must_not_be_asked, TOO_MUCH_DATA),
        (None, None, 1001, 1000, _no, TOO_MUCH_DATA),
        (None, None, 10**12, None, _no, None),  # no limit
        (None, None, 10**12, 0, _no, None),  # 0: no limit
        (None, None, 0, 1000, _no, None),
        # the order of the rules: the command order (HELO, RCPT), the body budget, the size
        (HELO_FIRST, None, 10**9, 10, _must_not_be_asked, HELO_FIRST),
        (NEED_RCPT, None, 10**9, 10, _must_not_be_asked, NEED_RCPT),
        (None, None, 10**9, 10, _full, INSUFFICIENT_STORAGE),
        (None, 0, 10, 1000, _must_not_be_asked, None),  # budget asked for a first chunk only
    ],
)
def test_chunk_refusal(
    order: str | None,
    received: int | None,
    size: int,
    limit: int | None,
    room: Callable[[], bool],
    reply: str | None,
) -> None:
    assert chunk_refusal(order, received, size, limit, room) == reply


def test_chunk_accepted() -> None:
    assert chunk_accepted(512) == "250 Message OK, 512 octets received"
