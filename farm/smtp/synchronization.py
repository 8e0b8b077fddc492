"""SMTP command synchronization (RFC 2920 section 3.1, RFC 5321 section 4.3.1).

A client may send a command before the reply to the previous one only where PIPELINING allows
it: after EHLO, with the extension offered, and never right behind a command whose reply
changes what it may send next. Bots that fire a whole dialogue in one write break this rule;
real MTAs do not. With ``forbid_unauth_pipelining`` the engine asks :func:`sent_too_soon` about
each command line that arrived with more input already behind it, and refuses the client
(:data:`SYNCHRONIZATION_ERROR`, then close) as Postfix's ``smtpd_forbid_unauth_pipelining``
does.
"""

from __future__ import annotations

from typing import Final

from farm.smtp.arguments import split_command

SYNCHRONIZATION_ERROR: Final = "554 5.5.0 Error: SMTP protocol synchronization"

#: Commands that must end a pipelined group (RFC 2920 3.1; LHLO is LMTP's EHLO).
_LAST_IN_GROUP: Final = frozenset({"EHLO", "HELO", "LHLO", "DATA", "VRFY", "EXPN", "NOOP", "TURN"})
#: Commands that are never refused for the input behind them: a BDAT chunk's octets follow
#: its command by design (RFC 3030); QUIT ends the session whatever follows; input behind
#: STARTTLS is discarded before the handshake (RFC 3207 5, the CVE-2011-0411 class).
_ANY_INPUT_BEHIND: Final = frozenset({"BDAT", "QUIT", "STARTTLS"})


def command_verb(line: bytes) -> str:
    """The verb the engine dispatches ``line`` on (:func:`split_command`'s: upper case, up to
    the first space; empty when there is none or it is not ASCII)."""
    parts = split_command(line, True)
    return parts[0] if parts is not None else ""


def sent_too_soon(line: bytes, pipelining_in_effect: bool) -> bool:
    """Whether input behind ``line`` (already received) breaks command synchronization.

    ``pipelining_in_effect``: the session's EHLO was answered with PIPELINING.
    """
    verb = command_verb(line)
    if verb in _ANY_INPUT_BEHIND:
        return False
    return not pipelining_in_effect or verb in _LAST_IN_GROUP
