"""MAIL FROM / RCPT TO arguments -> request or reply (farm.smtp.mail_rcpt), without a socket."""

from __future__ import annotations

from typing import Any

import pytest

from farm.smtp.mail_rcpt import MailRequest, RcptRequest, parse_mail, parse_rcpt, utf8_refusal

MAIL_SYNTAX = "501 Syntax: MAIL FROM: <address>"
MAIL_ESMTP_SYNTAX = MAIL_SYNTAX + " [SP <mail-parameters>]"
RCPT_SYNTAX = "501 Syntax: RCPT TO: <address>"
RCPT_ESMTP_SYNTAX = RCPT_SYNTAX + " [SP <mail-parameters>]"
MALFORMED = "553 5.1.3 Error: malformed address"
MAIL_555 = "555 MAIL FROM parameters not recognized or not implemented"
RCPT_555 = "555 RCPT TO parameters not recognized or not implemented"

ESMTP: dict[str, Any] = {"esmtp": True, "in_transaction": False}
DSN: dict[str, Any] = {**ESMTP, "dsn": True}

#: (argument, settings, expected request or reply)
MAIL_CASES: list[tuple[str | None, dict[str, Any], MailRequest | str]] = [
    ("FROM:<a@b>", ESMTP, ("a@b", [], False)),
    ("from: <a@b>", ESMTP, ("a@b", [], False)),
    ("FROM:<>", ESMTP, ("<>", [], False)),
    ("FROM:<a@b>", {"esmtp": False, "in_transaction": False}, ("a@b", [], False)),
    # syntax
    (None, ESMTP, MAIL_ESMTP_SYNTAX),
    (None, {"esmtp": False, "in_transaction": False}, MAIL_SYNTAX),
    ("TO:<a@b>", ESMTP, MAIL_ESMTP_SYNTAX),
    ("FROM:", ESMTP, MAIL_ESMTP_SYNTAX),
    ("FROM:<a@b> SIZE=10", {"esmtp": False, "in_transaction": False}, MAIL_SYNTAX),
    ("FROM:<a@b@c>", ESMTP, MALFORMED),
    ("FROM:<aaaa@b>", {**ESMTP, "local_part_limit": 3}, MALFORMED),
    ("FROM:<aaa@b>", {**ESMTP, "local_part_limit": 3}, ("aaa@b", [], False)),
    # nested MAIL: only once the address parsed
    ("FROM:<a@b>", {"esmtp": True, "in_transaction": True}, "503 Error: nested MAIL command"),
    (None, {"esmtp": True, "in_transaction": True}, MAIL_ESMTP_SYNTAX),
    ("FROM:<a@b@c>", {"esmtp": True, "in_transaction": True}, MALFORMED),
    # parameters
    ("FROM:<a@b> size=10", ESMTP, ("a@b", ["SIZE=10"], False)),
    ("FROM:<a@b> SIZE=", ESMTP, MAIL_ESMTP_SYNTAX),
    ("FROM:<a@b> SIZE", ESMTP, MAIL_ESMTP_SYNTAX),
    ("FROM:<a@b> SIZE=1x", ESMTP, MAIL_ESMTP_SYNTAX),
    (
        "FROM:<a@b> SIZE=101",
        {**ESMTP, "data_size_limit": 100},
        "552 Error: message size exceeds fixed maximum message size",
    ),
    (
        "FROM:<a@b> SIZE=100",
        {**ESMTP, "data_size_limit": 100},
        ("a@b", ["SIZE=100"], False),
    ),
    (
        "FROM:<a@b> SIZE=101",
        {**ESMTP, "data_size_limit": 0},
        ("a@b", ["SIZE=101"], False),
    ),
    ("FROM:<a@b> BODY=8BITMIME", ESMTP, ("a@b", ["BODY=8BITMIME"], False)),
    ("FROM:<a@b> BODY=7bit", ESMTP, ("a@b", ["BODY=7BIT"], False)),
    ("FROM:<a@b> BODY=BINARYMIME", ESMTP, "501 Error: BODY can only be one of 7BIT, 8BITMIME"),
    ("FROM:<a@b> BODY", ESMTP, "501 Error: BODY can only be one of 7BIT, 8BITMIME"),
    ("FROM:<a@b> BODY=BINARYMIME", {**ESMTP, "decode_data": True}, MAIL_555),
    (
        "FROM:<a@b> SMTPUTF8",
        {**ESMTP, "smtputf8_enabled": True},
        ("a@b", ["SMTPUTF8"], True),
    ),
    ("FROM:<a@b> SMTPUTF8", ESMTP, "501 Error: SMTPUTF8 disabled"),
    (
        "FROM:<a@b> SMTPUTF8=yes",
        {**ESMTP, "smtputf8_enabled": True},
        "501 Error: SMTPUTF8 takes no arguments",
    ),
    ("FROM:<a@b> XFOO=1", ESMTP, MAIL_555),
    ("FROM:<a@b> X-FOO", ESMTP, MAIL_ESMTP_SYNTAX),
    # DSN: RET and ENVID only when it is on
    (
        "FROM:<a@b> RET=HDRS ENVID=Ab+2B",
        DSN,
        ("a@b", ["RET=HDRS", "ENVID=Ab+2B"], False),
    ),
    ("FROM:<a@b> ret=full", DSN, ("a@b", ["RET=FULL"], False)),
    ("FROM:<a@b> RET=HDRS", ESMTP, MAIL_555),
    ("FROM:<a@b> RET=SOME", DSN, MAIL_ESMTP_SYNTAX),
    ("FROM:<a@b> ENVID=" + "x" * 101, DSN, MAIL_ESMTP_SYNTAX),
    ("FROM:<a@b> ENVID=a+b", DSN, MAIL_ESMTP_SYNTAX),
    ("FROM:<a@b> NOTIFY=NEVER", DSN, MAIL_555),
    # the first fault in aiosmtpd's order decides
    ("FROM:<a@b> BODY=X SMTPUTF8", ESMTP, "501 Error: BODY can only be one of 7BIT, 8BITMIME"),
    ("FROM:<a@b> SIZE=x XFOO", ESMTP, MAIL_ESMTP_SYNTAX),
    ("FROM:<a@b> XFOO SMTPUTF8", ESMTP, "501 Error: SMTPUTF8 disabled"),
]


@pytest.mark.parametrize(("arg", "settings", "expected"), MAIL_CASES)
def test_mail(arg: str | None, settings: dict[str, Any], expected: MailRequest | str) -> None:
    assert parse_mail(arg, **settings) == expected


RCPT: dict[str, Any] = {"esmtp": True, "recipients": 0}
RCPT_DSN: dict[str, Any] = {**RCPT, "dsn": True}

RCPT_CASES: list[tuple[str | None, dict[str, Any], RcptRequest | str]] = [
    ("TO:<c@d>", RCPT, ("c@d", [])),
    ("to: <c@d>", RCPT, ("c@d", [])),
    ("TO:<c@d>", {"esmtp": False, "recipients": 0}, ("c@d", [])),
    (None, RCPT, RCPT_ESMTP_SYNTAX),
    (None, {"esmtp": False, "recipients": 0}, RCPT_SYNTAX),
    ("FROM:<c@d>", RCPT, RCPT_ESMTP_SYNTAX),
    ("TO:", RCPT, RCPT_ESMTP_SYNTAX),
    ("TO:<c@d> XFOO", {"esmtp": False, "recipients": 0}, RCPT_SYNTAX),
    ("TO:<c@d@e>", RCPT, MALFORMED),
    ("TO:<c@d> XFOO=1", RCPT, RCPT_555),
    ("TO:<c@d> X=", RCPT, RCPT_ESMTP_SYNTAX),
    (
        "TO:<c@d> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;c@d",
        RCPT_DSN,
        ("c@d", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;c@d"]),
    ),
    ("TO:<c@d> notify=never", RCPT_DSN, ("c@d", ["NOTIFY=NEVER"])),
    ("TO:<c@d> NOTIFY=NEVER,SUCCESS", RCPT_DSN, RCPT_ESMTP_SYNTAX),
    ("TO:<c@d> NOTIFY=SUCCESS,SUCCESS", RCPT_DSN, RCPT_ESMTP_SYNTAX),
    ("TO:<c@d> NOTIFY", RCPT_DSN, RCPT_ESMTP_SYNTAX),
    ("TO:<c@d> ORCPT=c@d", RCPT_DSN, RCPT_ESMTP_SYNTAX),
    ("TO:<c@d> NOTIFY=SUCCESS", RCPT, RCPT_555),
    ("TO:<c@d> RET=FULL", RCPT_DSN, RCPT_555),
    # max_recipients, checked last
    (
        "TO:<c@d>",
        {**RCPT, "recipients": 2, "max_recipients": 2},
        "452 4.5.3 Error: too many recipients",
    ),
    ("TO:<c@d>", {**RCPT, "recipients": 1, "max_recipients": 2}, ("c@d", [])),
    ("TO:<c@d>", {**RCPT, "recipients": 5, "max_recipients": None}, ("c@d", [])),
    ("TO:<c@d> XFOO", {**RCPT, "recipients": 2, "max_recipients": 2}, RCPT_555),
]


@pytest.mark.parametrize(("arg", "settings", "expected"), RCPT_CASES)
def test_rcpt(arg: str | None, settings: dict[str, Any], expected: RcptRequest | str) -> None:
    assert parse_rcpt(arg, **settings) == expected


def test_each_request_has_its_own_parameter_list() -> None:
    """The handler's hooks get the list and may change it; the next command must not see it."""
    first, second = parse_mail("FROM:<a@b>", **ESMTP), parse_mail("FROM:<a@b>", **ESMTP)
    rcpt_first, rcpt_second = parse_rcpt("TO:<c@d>", **RCPT), parse_rcpt("TO:<c@d>", **RCPT)
    assert not isinstance(first, str) and not isinstance(second, str)
    assert not isinstance(rcpt_first, str) and not isinstance(rcpt_second, str)
    assert first[1] is not second[1] and rcpt_first[1] is not rcpt_second[1]


BAD_UTF8 = "500 5.5.2 Error: bad UTF-8 syntax"
UNDECLARED = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"


@pytest.mark.parametrize(
    ("address", "declared", "expected"),
    [
        ("a@b", False, None),
        ("<>", False, None),
        ("jürgen@b", True, None),
        ("用户@例子.广告", True, None),
        ("jürgen@b", False, UNDECLARED),
        (b"\xff\xfe@b".decode("utf-8", "surrogateescape"), True, BAD_UTF8),
        (b"v\xc3@b".decode("utf-8", "surrogateescape"), False, BAD_UTF8),
    ],
)
def test_utf8_refusal(address: str, declared: bool, expected: str | None) -> None:
    """strict_smtputf8: broken UTF-8 first (500 5.5.2, declared or not), then the declaration."""
    assert utf8_refusal(address, declared) == expected
