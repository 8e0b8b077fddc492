"""A command line -> (verb, argument) (farm.smtp.arguments.split_command), without a socket."""

from __future__ import annotations

import pytest

from farm.smtp.arguments import split_command

#: (line, SMTPUTF8 on, expected (verb, argument) or None for "500 Error: strict ASCII mode")
CASES: list[tuple[bytes, bool, tuple[str, str | None] | None]] = [
    (b"NOOP", False, ("NOOP", None)),
    (b"noop", False, ("NOOP", None)),
    (b"mail FROM:<a@b>", False, ("MAIL", "FROM:<a@b>")),
    (b"MAIL  FROM:<a@b>  \t", False, ("MAIL", "FROM:<a@b>")),
    (b"NOOP ", False, ("NOOP", "")),
    (b"", False, ("", None)),
    (b" NOOP", False, ("", None)),
    (b"N\xc3\xb6OP", False, ("", None)),
    (b"N\xc3\xb6OP x\xff", False, ("", None)),  # the verb is judged first
    (b"RCPT TO:<j\xc3\xb6@b>", False, None),
    (b"RCPT TO:<j\xc3\xb6@b>", True, ("RCPT", "TO:<j\u00f6@b>")),
    (b"RCPT TO:<j\xff@b>", True, ("RCPT", "TO:<j\udcff@b>")),
]


@pytest.mark.parametrize(("line", "smtputf8", "expected"), CASES)
def test_split_command(line: bytes, smtputf8: bool, expected: object) -> None:
    assert split_command(line, smtputf8) == expected
