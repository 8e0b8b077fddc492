"""Sans-I/O protocol rules of a session: given a state, the decision (no asyncio here).

The asyncio protocol (:class:`farm.smtp.server.SMTP`) holds the state and does the I/O; the
rules it applies live here as pure functions, tested without a socket
(``tests/unit/test_state_gate.py``). So far: the policy gate every command passes when a
policy is on (TLS handshake, ``require_starttls``, drain, per-verb call limits,
``auth_required``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

#: Commands allowed before STARTTLS when ``require_starttls`` is set.
ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})
#: Commands allowed before AUTH when ``auth_required`` is set.
ALLOWED_BEFORE_AUTH = frozenset({"AUTH", "EHLO", "HELO", "NOOP", "RSET", "QUIT"})

SHUTTING_DOWN = "421 4.3.2 Service shutting down"
TLS_FAILED = "554 Command refused due to lack of security"
STARTTLS_FIRST = "530 Must issue a STARTTLS command first"
AUTH_FIRST = "530 5.7.0 Authentication required"


class Refusal(NamedTuple):
    """A command refused by the gate: the reply, and whether the session closes after it."""

    reply: str
    close: bool = False


class GateState(NamedTuple):
    """What the gate looks at besides the verb."""

    #: False once a STARTTLS handshake failed: only QUIT is answered.
    tls_handshake_okay: bool = True
    #: ``require_starttls`` is set and the session is not (yet) on TLS.
    starttls_missing: bool = False
    #: The server drains (shutdown, reload): a session outside a transaction is told 421.
    draining: bool = False
    #: A MAIL FROM was accepted and the transaction is not over.
    in_transaction: bool = False
    auth_required: bool = False
    authenticated: bool = False


def refusal_before_verb(verb: str, state: GateState) -> Refusal | None:
    """The TLS and drain rules, which apply to every command, known or not."""
    if not state.tls_handshake_okay and verb != "QUIT":
        return Refusal(TLS_FAILED)
    if state.starttls_missing and verb not in ALLOWED_BEFORE_STARTTLS:
        return Refusal(STARTTLS_FIRST)
    if state.draining and not state.in_transaction and verb != "QUIT":
        return Refusal(SHUTTING_DOWN, close=True)
    return None


def call_limit_exceeded(
    counts: dict[str, int], limits: Mapping[str, int], default: int, verb: str
) -> bool:
    """Count one call of ``verb`` in ``counts``; True when that call is past its limit."""
    used = counts.get(verb, 0) + 1
    counts[verb] = used
    return used > limits.get(verb, default)


def too_many_calls(verb: str) -> Refusal:
    return Refusal(f"421 4.7.0 {verb} sent too many times", close=True)


def refusal_for_auth(verb: str, state: GateState) -> Refusal | None:
    """``auth_required``: only the commands of :data:`ALLOWED_BEFORE_AUTH` before AUTH."""
    if state.auth_required and not state.authenticated and verb not in ALLOWED_BEFORE_AUTH:
        return Refusal(AUTH_FIRST)
    return None
