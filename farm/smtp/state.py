"""Sans-I/O protocol state of a session, and the rules that decide on it (no asyncio here).

The asyncio protocol (:class:`farm.smtp.server.SMTP`) holds one :class:`ConnectionState` and
does the I/O; the rules it applies live here as pure functions, tested without a socket
(``tests/unit/test_state_gate.py``, ``tests/unit/test_state_ordering.py``):

- the policy gate every command passes when a policy is on (TLS handshake,
  ``require_starttls``, drain, per-verb call limits, ``auth_required``);
- the command-sequence rules of a transaction (HELO before MAIL, MAIL before RCPT, RCPT
  before DATA/BDAT).

MAIL/RCPT arguments are decided in :mod:`farm.smtp.mail_rcpt`, the timers in
:mod:`farm.smtp.deadlines`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from farm.smtp.settings import DEFAULTS

#: Commands allowed before STARTTLS when ``require_starttls`` is set.
ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})
#: Commands allowed before AUTH when ``auth_required`` is set.
ALLOWED_BEFORE_AUTH = frozenset({"AUTH", "EHLO", "HELO", "NOOP", "RSET", "QUIT"})

SHUTTING_DOWN = "421 4.3.2 Service shutting down"
TLS_FAILED = "554 Command refused due to lack of security"
STARTTLS_FIRST = "530 Must issue a STARTTLS command first"
AUTH_FIRST = "530 5.7.0 Authentication required"


#: The reply to a transaction command before HELO/EHLO (LMTP replaces it: LHLO).
HELO_FIRST = "503 Error: send HELO first"
NEED_MAIL = "503 Error: need MAIL command"
NEED_RCPT = "503 Error: need RCPT command"
NESTED_MAIL = "503 Error: nested MAIL command"
DATA_AFTER_BDAT = "503 5.5.1 Error: DATA cannot follow BDAT in one transaction"


class Phase(enum.IntEnum):
    """Where a connection is in its life (the transaction's place is read from the envelope:
    see :func:`ordering_refusal`)."""

    #: Accepted; the greeting is not out yet (PROXY header, limiter, greeting delay, stages).
    CONNECTED = 0
    #: The 220 is out: commands are read and answered.
    GREETED = 1


@dataclass(slots=True)
class ConnectionState:
    """A connection's phase, counters and clocks, in one slotted object (one per session).

    The HELO name and the transaction are not copied here: they live in aiosmtpd's
    ``session.host_name`` and ``envelope`` (``mail_from``, ``rcpt_tos``), which handlers read
    and write, so the rules read them from there. Times are the event loop's clock, passed in.
    The transport's own flags (closing, draining, reading paused) stay on the protocol, and
    so, for now, do the AUTH, STARTTLS and BDAT fields of its mixins.
    """

    phase: Phase = Phase.CONNECTED
    #: Command lines received (for the session's log line and the error limits).
    commands: int = 0
    #: Unknown commands still answered 500; at zero the next one closes the session (502).
    unknown_left: int = DEFAULTS.unknown_command_limit
    #: Calls per verb, when ``command_call_limit`` is set (None until the first call).
    call_counts: dict[str, int] | None = None
    #: When the connection was accepted.
    started: float = 0.0
    #: When the client last completed a line (or our last task ended): the idle clock's start.
    last_line: float = 0.0
    #: When a DATA/BDAT body times out (moved on by ``min_data_rate`` as octets arrive).
    data_deadline: float = 0.0
    #: When the transaction began (MAIL FROM), for the message's log line.
    data_started: float = 0.0
    #: When the running command or delivery task started (hung hooks time out from there).
    task_started: float = 0.0
    #: The client leaves our replies unread (the transport paused our writes).
    write_paused: bool = False
    #: Since when writes are paused.
    write_paused_at: float = 0.0


def ordering_refusal(
    verb: str,
    host_name: str | None,
    mail_from: str | None,
    rcpt_tos: Sequence[str],
    helo_required: str = HELO_FIRST,
) -> str | None:
    """The command-sequence rule a transaction command breaks before its arguments are read,
    if any: MAIL, RCPT, DATA and BDAT need HELO/EHLO; RCPT needs MAIL; DATA and BDAT need a
    RCPT. The other arguments are what the session has on record: its HELO name, the
    transaction's sender and recipients (aiosmtpd's ``session``/``envelope`` fields).

    (A nested MAIL is refused only once its address parsed: :mod:`farm.smtp.mail_rcpt`.)
    """
    if not host_name:
        return helo_required if verb in _TRANSACTION_VERBS else None
    if verb == "RCPT":
        return None if mail_from else NEED_MAIL
    if verb == "DATA" or verb == "BDAT":
        return None if rcpt_tos else NEED_RCPT
    return None


_TRANSACTION_VERBS = frozenset({"MAIL", "RCPT", "DATA", "BDAT"})


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
