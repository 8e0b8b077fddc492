"""Sans-I/O protocol state of a session, and the rules that decide on it (no asyncio here).

The asyncio protocol (:class:`farm.smtp.server.SMTP`) holds one :class:`ConnectionState` per
connection: the phase, the counters and clocks, the AUTH, STARTTLS and BDAT flags and how the
session ends. The protocol keeps what is I/O: the transport (and whether its reads are
paused), tasks, timers, waiters, the limiter's key, and the message bodies being received
(memory counted in a budget, maybe a spool file: resources to close when the transaction
ends).

The HELO name and the transaction are not copied here, on purpose: they live in aiosmtpd's
``session.host_name`` and ``envelope`` (``mail_from``, ``rcpt_tos``), which handlers read and
write, so a copy would be a second source of truth; the rules take them as arguments.

The rules the protocol applies live here as pure functions, tested without a socket
(``tests/unit/test_state_gate.py``, ``tests/unit/test_state_ordering.py``):

- the policy gate every command passes when a policy is on (TLS handshake,
  ``require_starttls``, drain, per-verb call limits, ``auth_required``), and whether it is on;
- the command-sequence rules of a transaction (HELO before MAIL, MAIL before RCPT, RCPT
  before DATA/BDAT).

MAIL/RCPT arguments are decided in :mod:`farm.smtp.mail_rcpt`, BDAT's in
:mod:`farm.smtp.chunking`, AUTH's in :mod:`farm.smtp.sasl`, the timers in
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
    """A connection's protocol state, in one slotted object (one per session; no dicts but
    ``call_counts``, made only when call limits are set). Times are the event loop's clock,
    passed in. See the module's docstring for what is kept elsewhere, and why."""

    phase: Phase = Phase.CONNECTED
    #: Set while a ``greeting_delay`` (or a greeting stage) runs: any byte from the client
    #: then is an early talk.
    early_talker_watch: bool = False
    #: Command lines received (for the session's log line and the error limits).
    commands: int = 0
    #: The verb being answered (for enhanced status codes).
    verb: str | None = None
    #: Unknown commands still answered 500; at zero the next one closes the session (502).
    unknown_left: int = DEFAULTS.unknown_command_limit
    #: Calls per verb, when ``command_call_limit`` is set (None until the first call).
    call_counts: dict[str, int] | None = None

    # -- AUTH, STARTTLS, BDAT --------------------------------------------------------------
    #: Failed AUTH exchanges (``auth_failure_limit`` of them close the session).
    auth_failures: int = 0
    #: True while a STARTTLS handshake runs (a draining server aborts it: no mail in flight).
    in_tls_handshake: bool = False
    #: False once the handler's ``handle_STARTTLS`` refused the handshake: only QUIT is
    #: answered.
    tls_handshake_okay: bool = True
    #: For the BDAT chunk being read: is it the last, and the reply refusing it ("": refused
    #: before ``smtp_BDAT`` ran, already answered; None: accepted). Whether the transaction
    #: has BDAT content is whether the protocol holds a BDAT body.
    bdat_last: bool = False
    bdat_refusal: str | None = None

    # -- the end ---------------------------------------------------------------------------
    #: The server drains (shutdown, reload): outside a transaction the session is told 421.
    draining: bool = False
    #: The client closed its side: the session closes once the command in hand is done.
    eof: bool = False
    #: Close once the queued replies are written; no further command is read.
    close_after_flush: bool = False
    #: The connection is gone (``connection_lost`` ran).
    closed: bool = False
    #: How the session ended, for the stats and its log line: quit, timeout, shutdown or
    #: error (None: the client disconnected, or the connection broke).
    ended_how: str | None = None

    # -- clocks ----------------------------------------------------------------------------
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


def gate_needed(
    state: ConnectionState, starttls_missing: bool, call_limits: bool, auth_required: bool
) -> bool:
    """Whether commands must pass the gate at all (rarely: a session without these policies
    goes around it). ``starttls_missing``: ``require_starttls`` is set and the session is
    not (yet) on TLS; ``call_limits``: ``command_call_limit`` is set."""
    return (
        not state.tls_handshake_okay
        or starttls_missing
        or state.draining
        or call_limits
        or auth_required
    )


def refusal_before_verb(
    verb: str, state: ConnectionState, starttls_missing: bool, in_transaction: bool
) -> Refusal | None:
    """The TLS and drain rules, which apply to every command, known or not.
    ``in_transaction``: a MAIL FROM was accepted and the transaction is not over (a drain
    lets it finish)."""
    if not state.tls_handshake_okay and verb != "QUIT":
        return Refusal(TLS_FAILED)
    if starttls_missing and verb not in ALLOWED_BEFORE_STARTTLS:
        return Refusal(STARTTLS_FIRST)
    if state.draining and not in_transaction and verb != "QUIT":
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


def refusal_for_auth(verb: str, auth_required: bool, authenticated: bool) -> Refusal | None:
    """``auth_required``: only the commands of :data:`ALLOWED_BEFORE_AUTH` before AUTH
    (``authenticated`` is the session's flag, which a handler may set too)."""
    if auth_required and not authenticated and verb not in ALLOWED_BEFORE_AUTH:
        return Refusal(AUTH_FIRST)
    return None
