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
    ConnectionState,
    Refusal,
    call_limit_exceeded,
    gate_needed,
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

# (conditions, {verb: expected refusal}); a verb not listed passes (None). The conditions
# are the keywords of before_verb: the connection's state and what the protocol adds to it.
BEFORE_VERB: list[tuple[dict[str, bool], dict[str, Refusal]]] = [
    (dict(), {}),
    (
        dict(tls_handshake_okay=False),
        {v: Refusal(TLS_FAILED) for v in VERBS if v != "QUIT"},
    ),
    (
        dict(starttls_missing=True),
        {
            v: Refusal(STARTTLS_FIRST)
            for v in VERBS
            if v not in {"NOOP", "EHLO", "STARTTLS", "QUIT"}
        },
    ),
    (
        dict(draining=True),
        {v: Refusal(SHUTTING_DOWN, close=True) for v in VERBS if v != "QUIT"},
    ),
    (dict(draining=True, in_transaction=True), {}),
    # The failed handshake wins over the missing STARTTLS and the drain.
    (
        dict(tls_handshake_okay=False, starttls_missing=True, draining=True),
        {v: Refusal(TLS_FAILED) for v in VERBS if v != "QUIT"},
    ),
    # STARTTLS first wins over the drain; what it lets through is then drained.
    (
        dict(starttls_missing=True, draining=True),
        {
            v: Refusal(STARTTLS_FIRST)
            if v not in {"NOOP", "EHLO", "STARTTLS", "QUIT"}
            else Refusal(SHUTTING_DOWN, close=True)
            for v in VERBS
            if v != "QUIT"
        },
    ),
]


def before_verb(
    verb: str,
    tls_handshake_okay: bool = True,
    starttls_missing: bool = False,
    draining: bool = False,
    in_transaction: bool = False,
) -> Refusal | None:
    state = ConnectionState(tls_handshake_okay=tls_handshake_okay, draining=draining)
    return refusal_before_verb(verb, state, starttls_missing, in_transaction)


@pytest.mark.parametrize(("conditions", "expected"), BEFORE_VERB)
@pytest.mark.parametrize("verb", VERBS)
def test_refusal_before_verb(
    conditions: dict[str, bool], expected: dict[str, Refusal], verb: str
) -> None:
    assert before_verb(verb, **conditions) == expected.get(verb)


@pytest.mark.parametrize(("conditions", "expected"), BEFORE_VERB)
def test_the_gate_is_on_whenever_it_refuses(
    conditions: dict[str, bool], expected: dict[str, Refusal]
) -> None:
    """A session the gate is skipped for (``gate_needed`` False) must be one it passes."""
    state = ConnectionState(
        tls_handshake_okay=conditions.get("tls_handshake_okay", True),
        draining=conditions.get("draining", False),
    )
    needed = gate_needed(state, conditions.get("starttls_missing", False), False, False)
    assert needed or not expected


@pytest.mark.parametrize(
    ("state", "starttls_missing", "call_limits", "auth_required", "needed"),
    [
        (ConnectionState(), False, False, False, False),
        (ConnectionState(tls_handshake_okay=False), False, False, False, True),
        (ConnectionState(draining=True), False, False, False, True),
        (ConnectionState(), True, False, False, True),
        (ConnectionState(), False, True, False, True),
        (ConnectionState(), False, False, True, True),
    ],
)
def test_gate_needed(
    state: ConnectionState,
    starttls_missing: bool,
    call_limits: bool,
    auth_required: bool,
    needed: bool,
) -> None:
    assert gate_needed(state, starttls_missing, call_limits, auth_required) is needed


# (auth_required, authenticated, the verbs refused)
AUTH_TABLE = [
    (False, False, set()),
    (False, True, set()),
    (True, True, set()),
    (True, False, {"MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN", "HELP", "STARTTLS", "XYZZY"}),
]


@pytest.mark.parametrize(("auth_required", "authenticated", "refused"), AUTH_TABLE)
@pytest.mark.parametrize("verb", VERBS)
def test_refusal_for_auth(
    auth_required: bool, authenticated: bool, refused: set[str], verb: str
) -> None:
    expected = Refusal(AUTH_FIRST) if verb in refused else None
    assert refusal_for_auth(verb, auth_required, authenticated) == expected


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
