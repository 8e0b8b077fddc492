"""The command synchronization rule (farm.smtp.synchronization), as a pure function."""

from __future__ import annotations

import pytest

from farm.smtp.synchronization import command_verb, sent_too_soon


@pytest.mark.parametrize(
    "line", [b"EHLO x", b"helo x", b"LHLO x", b"DATA", b"VRFY a", b"EXPN list", b"NOOP", b"TURN"]
)
def test_a_command_that_ends_a_group_may_have_nothing_behind_it(line: bytes) -> None:
    assert sent_too_soon(line, pipelining_in_effect=True)
    assert sent_too_soon(line, pipelining_in_effect=False)


@pytest.mark.parametrize("line", [b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"RSET", b"AUTH PLAIN"])
def test_other_commands_pipeline_only_where_pipelining_is_in_effect(line: bytes) -> None:
    assert not sent_too_soon(line, pipelining_in_effect=True)
    assert sent_too_soon(line, pipelining_in_effect=False)


@pytest.mark.parametrize("line", [b"BDAT 10", b"bdat 0 LAST", b"QUIT", b"STARTTLS"])
def test_bdat_quit_and_starttls_are_never_refused_for_what_follows(line: bytes) -> None:
    assert not sent_too_soon(line, pipelining_in_effect=True)
    assert not sent_too_soon(line, pipelining_in_effect=False)


def test_an_unknown_or_empty_line_pipelines_like_any_other_command() -> None:
    assert not sent_too_soon(b"XYZZY", pipelining_in_effect=True)
    assert sent_too_soon(b"", pipelining_in_effect=False)
    assert not sent_too_soon(b"   ", pipelining_in_effect=True)


def test_command_verb_is_the_one_the_engine_dispatches_on() -> None:
    assert command_verb(b"mail FROM:<a@b>") == "MAIL"
    assert command_verb(b"noop") == "NOOP"
    assert command_verb(b"") == ""
    assert command_verb(b"  mail FROM:<a@b>") == ""  # the engine: 500 Error: bad syntax
    assert command_verb(b"noop\t") == "NOOP\t"  # the engine: an unknown command
    assert command_verb(b"\xc3\xa9HLO x") == ""
