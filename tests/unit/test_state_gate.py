"""The policy gate (farm.smtp.state), phase x verb -> reply, without a socket."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import farm.smtp.state
from farm.smtp.state import (
    AUTH_FIRST,
    SHUTTING_DOWN,
    STARTTLS_FIRST,
    TLS_FAILED,
    GateState,
    Refusal,
    call_limit_exceeded,
    refusal_before_verb,
    refusal_for_auth,
    too_many_calls,
)

VERBS = (
    "HELO",
    "EHLO",
    "MAIL",
    "RCPT",
    "DATA",
    "BDAT",
    "RSET",
    "NOOP",
    "QUIT",
    "VRFY",
    "EXPN",
    "HELP",
    "AUTH",
    "STARTTLS",
    "XYZZY",
)

# (state, {verb: expected refusal}); a verb not listed passes (None).
BEFORE_VERB = [
    (GateState(), {}),
    (
        GateState(tls_handshake_okay=False),
        {v: Refusal(TLS_FAILED) for v in VERBS if v != "QUIT"},
    ),
    (
        GateState(starttls_missing=True),
        {
            v: Refusal(STARTTLS_FIRST)
            for v in VERBS
            if v not in {"NOOP", "EHLO", "STARTTLS", "QUIT"}
        },
    ),
    (
        GateState(draining=True),
        {v: Refusal(SHUTTING_DOWN, close=True) for v in VERBS if v != "QUIT"},
    ),
    (GateState(draining=True, in_transaction=True), {}),
    # The failed handshake wins over the missing STARTTLS and the drain.
    (
        GateState(tls_handshake_okay=False, starttls_missing=True, draining=True),
        {v: Refusal(TLS_FAILED) for v in VERBS if v != "QUIT"},
    ),
    # STARTTLS first wins over the drain; what it lets through is then drained.
    (
        GateState(starttls_missing=True, draining=True),
        {
            v: Refusal(STARTTLS_FIRST)
            if v not in {"NOOP", "EHLO", "STARTTLS", "QUIT"}
            else Refusal(SHUTTING_DOWN, close=True)
            for v in VERBS
            if v != "QUIT"
        },
    ),
]


@pytest.mark.parametrize(("state", "expected"), BEFORE_VERB)
@pytest.mark.parametrize("verb", VERBS)
def test_refusal_before_verb(state: GateState, expected: dict[str, Refusal], verb: str) -> None:
    assert refusal_before_verb(verb, state) == expected.get(verb)


AUTH_TABLE = [
    (GateState(), set()),
    (GateState(auth_required=True, authenticated=True), set()),
    (
        GateState(auth_required=True),
        {"MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN", "HELP", "STARTTLS", "XYZZY"},
    ),
]


@pytest.mark.parametrize(("state", "refused"), AUTH_TABLE)
@pytest.mark.parametrize("verb", VERBS)
def test_refusal_for_auth(state: GateState, refused: set[str], verb: str) -> None:
    expected = Refusal(AUTH_FIRST) if verb in refused else None
    assert refusal_for_auth(verb, state) == expected


def test_call_limits_count_per_verb_with_a_default() -> None:
    counts: dict[str, int] = {}
    limits = {"NOOP": 2}
    results = [call_limit_exceeded(counts, limits, 3, v) for v in ["NOOP"] * 3 + ["HELP"] * 4]
    assert results == [False, False, True, False, False, False, True]
    assert counts == {"NOOP": 3, "HELP": 4}
    assert too_many_calls("NOOP") == Refusal("421 4.7.0 NOOP sent too many times", close=True)


def test_state_module_is_sans_io() -> None:
    tree = ast.parse(Path(farm.smtp.state.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert imported.isdisjoint({"asyncio", "socket", "ssl", "selectors", "uvloop"})
