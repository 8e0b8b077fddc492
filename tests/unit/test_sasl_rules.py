"""AUTH (farm.smtp.sasl) without a socket: the command's refusals and parsing, base64 and PLAIN
decoding, what a mechanism's result means, and the 334 exchange over a scripted channel."""

from __future__ import annotations

import asyncio
from base64 import b64encode
from collections.abc import Coroutine
from typing import Any

import pytest

from farm.smtp.auth import AuthResult, LoginPassword
from farm.smtp.hooks import MISSING
from farm.smtp.sasl import (
    AUTH_ABORTED,
    BAD_BASE64,
    CANNOT_SPLIT,
    ENCRYPTION_REQUIRED,
    LINE_TOO_LONG,
    AuthAborted,
    AuthOutcome,
    AuthRequest,
    auth_outcome,
    challenge,
    count_failure,
    decode,
    login_exchange,
    parse_auth,
    plain_exchange,
    split_plain,
)
from farm.smtp.state import ConnectionState

READY = {
    "helo": True,
    "esmtp": True,
    "tls_missing": False,
    "authenticated": False,
    "in_transaction": False,
}


@pytest.mark.parametrize(
    ("arg", "state", "expected"),
    [
        ("PLAIN", {}, AuthRequest("PLAIN", ["PLAIN"])),
        ("plain", {}, AuthRequest("PLAIN", ["plain"])),
        ("PLAIN AGFiAGM=", {}, AuthRequest("PLAIN", ["PLAIN", "AGFiAGM="])),
        ("login  dXNlcg==", {}, AuthRequest("LOGIN", ["login", "dXNlcg=="])),
        ("PLAIN =", {}, AuthRequest("PLAIN", ["PLAIN", "="])),
        ("WITH-DASH", {}, AuthRequest("WITH-DASH", ["WITH-DASH"])),
        (None, {}, "501 Not enough value"),
        ("", {}, "501 Not enough value"),
        ("PLAIN a b", {}, "501 Too many values"),
        # the order of the rules: EHLO, ESMTP, encryption, not twice, not in a transaction
        (None, {"helo": False, "esmtp": False, "tls_missing": True}, "503 Error: send EHLO first"),
        (
            "PLAIN",
            {"esmtp": False, "tls_missing": True},
            "500 Error: command 'AUTH' not recognized",
        ),
        ("PLAIN", {"tls_missing": True, "authenticated": True}, ENCRYPTION_REQUIRED),
        ("PLAIN", {"authenticated": True, "in_transaction": True}, "503 Already authenticated"),
        (
            None,
            {"in_transaction": True},
            "503 5.5.1 Error: AUTH not permitted during a mail transaction",
        ),
    ],
)
def test_parse_auth(arg: str | None, state: dict[str, bool], expected: AuthRequest | str) -> None:
    assert parse_auth(arg, **(READY | state)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", b""),
        ("dXNlcg==", b"user"),
        (b"dXNlcg==", b"user"),
        ("AHUAcA==", b"\x00u\x00p"),
        ("dXNlcg", None),  # padding missing
        ("not-b64", None),
        ("dXN lcg==", None),
        ("=", None),
        ("d\u00e9", None),  # not ASCII
    ],
)
def test_decode(text: str | bytes, expected: bytes | None) -> None:
    assert decode(text) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (b"\x00user\x00pass", LoginPassword(b"user", b"pass")),
        (b"admin\x00user\x00pass", LoginPassword(b"user", b"pass")),
        (b"\x00\x00", LoginPassword(b"", b"")),
        (b"\x00onlylogin", None),
        (b"", None),
        (b"a\x00b\x00c\x00d", None),
    ],
)
def test_split_plain(response: bytes, expected: LoginPassword | None) -> None:
    assert split_plain(response) == expected


CREDENTIALS = LoginPassword(b"user", b"pass")


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (AuthResult(success=True), AuthOutcome(True, True, None, None, None)),
        (
            AuthResult(success=True, auth_data=CREDENTIALS, message="235 welcome"),
            AuthOutcome(True, True, "235 welcome", CREDENTIALS, b"user"),
        ),
        (AuthResult(success=False), AuthOutcome(False, True, None, None, None)),
        (
            AuthResult(success=False, handled=False, message="535 no"),
            AuthOutcome(False, False, "535 no", None, None),
        ),
        # the older style: the login data on success, MISSING or False on failure
        (b"user", AuthOutcome(True, False, None, b"user", b"user")),
        (True, AuthOutcome(True, False, None, True, True)),
        (MISSING, AuthOutcome(False, False, None, MISSING, MISSING)),
        (False, AuthOutcome(False, False, None, False, False)),
    ],
)
def test_auth_outcome(result: Any, expected: AuthOutcome) -> None:
    assert auth_outcome(result) == expected


@pytest.mark.parametrize(("limit", "closing"), [(3, [False, False, True]), (1, [True])])
def test_count_failure_closes_at_the_limit(limit: int, closing: list[bool]) -> None:
    state = ConnectionState()
    assert [count_failure(state, limit) for _ in closing] == closing
    assert state.auth_failures == len(closing)


class Script:
    """A SaslChannel whose client answers with the given lines (None: a line too long;
    ConnectionAbortedError: the client closed)."""

    def __init__(self, *lines: bytes | type[Exception] | None) -> None:
        self.lines = list(lines)
        self.replies: list[str] = []
        self.flushed = 0

    def _reply(self, text: str, plain: bool = False) -> None:
        self.replies.append(text)

    def _flush(self) -> None:
        self.flushed += 1

    async def _read_line(self) -> bytes | None:
        line = self.lines.pop(0)
        if isinstance(line, type):
            raise line("the client closed its side")
        return line


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def _b64(data: bytes) -> bytes:
    return b64encode(data)


def test_challenge_sends_334_and_decodes_the_answer() -> None:
    channel = Script(_b64(b"answer"))
    assert _run(challenge(channel, "User Name\x00")) == b"answer"
    assert channel.replies == ["334 VXNlciBOYW1lAA=="]
    assert channel.flushed == 1


def test_challenge_unencoded() -> None:
    channel = Script(_b64(b"x"))
    _run(challenge(channel, b"Go ahead", encode=False))
    assert channel.replies == ["334 Go ahead"]


@pytest.mark.parametrize(
    ("line", "replies"),
    [
        (b"*", ["334 ", AUTH_ABORTED]),
        (b"!!!", ["334 ", BAD_BASE64]),
        (None, ["334 ", LINE_TOO_LONG]),
        (ConnectionAbortedError, ["334 "]),  # the client is gone: nothing more is sent
    ],
)
def test_challenge_aborts(line: bytes | type[Exception] | None, replies: list[str]) -> None:
    channel = Script(line)
    with pytest.raises(AuthAborted):
        _run(challenge(channel, b""))
    assert channel.replies == replies


def test_challenge_warns_when_asked_to_log() -> None:
    with pytest.warns(UserWarning) as warned:
        _run(challenge(Script(_b64(b"x")), b"", warn_logging=True))
    assert [str(w.message) for w in warned] == [
        "AUTH interaction logging is enabled!",
        "Sensitive information might be leaked!",
    ]


@pytest.mark.parametrize(
    ("args", "lines", "credentials", "replies"),
    [
        (["PLAIN", "AHUAcA=="], [], LoginPassword(b"u", b"p"), []),
        (["PLAIN"], [_b64(b"\x00u\x00p")], LoginPassword(b"u", b"p"), ["334 "]),
        (["PLAIN", "="], [], None, [CANNOT_SPLIT]),  # an empty initial response
        (["PLAIN", "AG9ubHlsb2dpbg=="], [], None, [CANNOT_SPLIT]),
        (["PLAIN", "not-b64"], [], None, [BAD_BASE64]),
        (["PLAIN"], [b"*"], None, ["334 ", AUTH_ABORTED]),
    ],
)
def test_plain_exchange(
    args: list[str],
    lines: list[bytes],
    credentials: LoginPassword | None,
    replies: list[str],
) -> None:
    channel = Script(*lines)
    if credentials is None:
        with pytest.raises(AuthAborted):
            _run(plain_exchange(channel, args))
    else:
        assert _run(plain_exchange(channel, args)) == credentials
    assert channel.replies == replies


USER, PASSWORD = "334 VXNlciBOYW1lAA==", "334 UGFzc3dvcmQA"


@pytest.mark.parametrize(
    ("args", "lines", "credentials", "replies"),
    [
        (["LOGIN"], [_b64(b"u"), _b64(b"p")], LoginPassword(b"u", b"p"), [USER, PASSWORD]),
        (["LOGIN", "dQ=="], [_b64(b"p")], LoginPassword(b"u", b"p"), [PASSWORD]),
        (["LOGIN", "="], [], None, [BAD_BASE64]),  # LOGIN has no empty initial response
        (["LOGIN"], [b"*"], None, [USER, AUTH_ABORTED]),
        (["LOGIN"], [_b64(b"u"), b"%%"], None, [USER, PASSWORD, BAD_BASE64]),
    ],
)
def test_login_exchange(
    args: list[str],
    lines: list[bytes],
    credentials: LoginPassword | None,
    replies: list[str],
) -> None:
    channel = Script(*lines)
    exchange = login_exchange(channel, args, "User Name\x00", "Password\x00")
    if credentials is None:
        with pytest.raises(AuthAborted):
            _run(exchange)
    else:
        assert _run(exchange) == credentials
    assert channel.replies == replies
