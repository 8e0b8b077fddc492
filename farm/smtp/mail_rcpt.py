"""MAIL FROM / RCPT TO arguments -> the parsed request, or the reply that refuses it.

Pure functions (no I/O): the asyncio protocol checks the command order first
(:func:`farm.smtp.state.ordering_refusal`), then calls these, then runs the limiter, the
stages and the handler's hook with the result. The checks run in aiosmtpd's order, so a
command with several faults gets the same reply as there.
"""

from __future__ import annotations

from typing import TypeAlias

from farm.smtp.arguments import parse_params, parse_path, strip_keyword
from farm.smtp.dsn import dsn_mail_options_valid, dsn_rcpt_options_valid, split_options
from farm.smtp.state import NESTED_MAIL

MALFORMED_ADDRESS = "553 5.1.3 Error: malformed address"
MAIL_SYNTAX = "501 Syntax: MAIL FROM: <address>"
RCPT_SYNTAX = "501 Syntax: RCPT TO: <address>"
#: Added to the syntax replies after EHLO.
ESMTP_SYNTAX = " [SP <mail-parameters>]"
BAD_BODY = "501 Error: BODY can only be one of 7BIT, 8BITMIME"
SMTPUTF8_ARGUMENT = "501 Error: SMTPUTF8 takes no arguments"
SMTPUTF8_DISABLED = "501 Error: SMTPUTF8 disabled"
TOO_BIG = "552 Error: message size exceeds fixed maximum message size"
MAIL_UNKNOWN = "555 MAIL FROM parameters not recognized or not implemented"
RCPT_UNKNOWN = "555 RCPT TO parameters not recognized or not implemented"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
#: ``strict_smtputf8``: an address whose octets are not UTF-8 (Postfix's reply).
BAD_UTF8 = "500 5.5.2 Error: bad UTF-8 syntax"
#: ``strict_smtputf8``: a non-ASCII address in a transaction without SMTPUTF8 (RFC 6531 3.4;
#: Postfix's reply).
UNDECLARED_UTF8 = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"


#: ``(address, parameters, SMTPUTF8 asked)``; the parameters as the handler gets them
#: (``envelope.mail_options``). Plain tuples: a MAIL and a RCPT per message build one each.
MailRequest: TypeAlias = tuple[str, list[str], bool]
#: ``(address, parameters)``.
RcptRequest: TypeAlias = tuple[str, list[str]]


def _path(
    arg: str | None, keyword: str, syntax_error: str, esmtp: bool, local_part_limit: int
) -> tuple[str, str | None] | str:
    """``FROM:<address> params`` (``keyword`` ``FROM:`` or ``TO:``) -> (address, params), or
    the refusal: a syntax error, or 553 for a malformed address."""
    if arg is None:
        return syntax_error
    rest = strip_keyword(keyword, arg)
    if rest is None:
        return syntax_error
    address, params = parse_path(rest, local_part_limit)
    if address is None:
        return MALFORMED_ADDRESS
    if not address or (not esmtp and params):
        return syntax_error
    return address, params


def parse_mail(
    arg: str | None,
    *,
    esmtp: bool,
    in_transaction: bool,
    local_part_limit: int = 0,
    dsn: bool = False,
    decode_data: bool = False,
    smtputf8_enabled: bool = False,
    data_size_limit: int | None = None,
) -> MailRequest | str:
    """``MAIL`` with argument ``arg`` (after ``EHLO`` when ``esmtp``): the request, or the
    refusal. ``in_transaction``: a sender is already on record (503 nested MAIL)."""
    syntax_error = MAIL_SYNTAX + ESMTP_SYNTAX if esmtp else MAIL_SYNTAX
    path = _path(arg, "FROM:", syntax_error, esmtp, local_part_limit)
    if isinstance(path, str):
        return path
    address, params = path
    if in_transaction:
        return NESTED_MAIL
    if not params:  # the common case; what the checks below would find for no parameters
        return address, [], False
    mail_options = split_options(params, dsn)
    options = parse_params(mail_options)
    if options is None:
        return syntax_error
    if not decode_data and options.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
        return BAD_BODY
    smtputf8 = options.pop("SMTPUTF8", False)
    if smtputf8 is not False and smtputf8 is not True:
        return SMTPUTF8_ARGUMENT
    if smtputf8 and not smtputf8_enabled:
        return SMTPUTF8_DISABLED
    size = options.pop("SIZE", None)
    if size is not None:
        if not isinstance(size, str) or not (size.isascii() and size.isdigit()):
            return syntax_error
        if data_size_limit and int(size) > data_size_limit:
            return TOO_BIG
    if dsn and not dsn_mail_options_valid(options):
        return syntax_error
    if options:
        return MAIL_UNKNOWN
    return address, mail_options, smtputf8 is True


def parse_rcpt(
    arg: str | None,
    *,
    esmtp: bool,
    recipients: int,
    local_part_limit: int = 0,
    dsn: bool = False,
    max_recipients: int | None = None,
) -> RcptRequest | str:
    """``RCPT`` with argument ``arg``: the request, or the refusal. ``recipients``: how many
    the transaction has already (``max_recipients`` of them: 452)."""
    syntax_error = RCPT_SYNTAX + ESMTP_SYNTAX if esmtp else RCPT_SYNTAX
    path = _path(arg, "TO:", syntax_error, esmtp, local_part_limit)
    if isinstance(path, str):
        return path
    address, params = path
    if not params:  # the common case: only the recipient limit applies
        if max_recipients and recipients >= max_recipients:
            return TOO_MANY_RECIPIENTS
        return address, []
    rcpt_options = split_options(params, dsn)
    options = parse_params(rcpt_options)
    if options is None:
        return syntax_error
    if dsn and not dsn_rcpt_options_valid(options):
        return syntax_error
    if options:
        return RCPT_UNKNOWN
    if max_recipients and recipients >= max_recipients:
        return TOO_MANY_RECIPIENTS
    return address, rcpt_options


def utf8_refusal(address: str, declared: bool) -> str | None:
    """``strict_smtputf8``: the refusal of a MAIL or RCPT ``address`` (decoded with surrogate
    escapes for octets that are not UTF-8), or None. An ASCII address always passes; any
    other must be valid UTF-8 (500 5.5.2) in a transaction whose MAIL ``declared``
    SMTPUTF8 (553 5.6.7)."""
    if address.isascii():
        return None
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:  # a surrogate escape: an octet that was not UTF-8
        return BAD_UTF8
    return None if declared else UNDECLARED_UTF8
