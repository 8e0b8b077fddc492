"""Hypothesis-driven fuzzing of the framer and of the engine's command handling
(``tests/support/fuzz_targets.py``), marked ``fuzz``.

The normal suite runs a short pass (``FARM_FUZZ_EXAMPLES``, default 200 inputs per target).
A long run: ``make fuzz`` (``FARM_FUZZ_EXAMPLES=100000`` by default), or
``FARM_FUZZ_EXAMPLES=1000000 .venv/bin/python -m pytest -m fuzz tests/unit/test_fuzz.py``.
A crash is an exception escaping the code under test; an invariant violation (a malformed
reply line, a write after close, an ERROR logged, a chunk left unread, ...) fails too; hypothesis
then shrinks the input and prints it.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.smtp.body import MemoryBudget
from farm.smtp.framing import Chunk, Command, Framer
from tests.support.fuzz_targets import EngineCase, run_engine, run_framer

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("FARM_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # every run explores afresh (a failure prints its input)
    suppress_health_check=list(HealthCheck),
)

# -- building blocks: SMTP-ish bytes, heavy in the characters that matter --------------------------

ENDINGS = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\r\n", b"", b"\n\r"])
NOISE = st.binary(max_size=24) | st.sampled_from(
    [b".", b"..", b"\r", b"\n", b"\x00", b"\xc3\xa9", b"\xff", b" ", b"\t", b"\r\n.\r\n"]
)
ADDRESSES = st.sampled_from(
    [
        b"<a@b.test>",
        b"<>",
        b"<x@b.test>",
        b"<\xc3\xa9@b.test>",
        b"<a@[192.0.2.1]>",
        b'<"q@x"@b.test>',
        b"a@b",
        b"<@r:a@b>",
        b"<a@b> SIZE=10",
        b"<a@b> SIZE=99999999999",
        b"<a@b> BODY=8BITMIME SMTPUTF8",
        b"<a@b> RET=HDRS ENVID=x",
        b"<a@b> NOTIFY=NEVER ORCPT=rfc822;a@b",
        b"<a@b> FOO=BAR",
        b"<" + b"l" * 70 + b"@b>",
    ]
)
COMMANDS = st.one_of(
    st.tuples(
        st.sampled_from([b"MAIL FROM:", b"RCPT TO:", b"mail from: ", b"RCPT TO: "]),
        ADDRESSES | NOISE,
    ).map(b"".join),
    st.tuples(
        st.sampled_from([b"EHLO ", b"HELO ", b"LHLO ", b"VRFY ", b"HELP ", b"NOOP ", b"EXPN "]),
        st.sampled_from([b"client.test", b"", b"x"]) | NOISE,
    ).map(b"".join),
    st.tuples(
        st.just(b"BDAT "),
        st.sampled_from([b"0", b"1", b"5", b"12", b"x", b"", b"99999999999"]),
        st.sampled_from([b"", b" LAST", b" last", b" NOPE"]),
    ).map(b"".join),
    st.sampled_from(
        [
            b"DATA",
            b"RSET",
            b"QUIT",
            b"NOOP",
            b"STARTTLS",
            b"AUTH PLAIN AHVzZXIAc2VjcmV0",  # \0user\0secret
            b"AUTH PLAIN",
            b"AUTH LOGIN",
            b"dXNlcg==",
            b"c2VjcmV0",
            b"*",
            b"AUTH CRAM-MD5",
            b"XYZZY",
            b"",
            b"HELP",
            b"DATA x",
            b"A" * 600,
        ]
    ),
    NOISE,
)
BODIES = st.lists(
    st.sampled_from([b"Subject: x\r\n", b"\r\n", b".", b"..", b"body", b"\r\n.\r\n", b"\n.\n"])
    | NOISE,
    max_size=12,
).map(b"".join)


CRLF_MOSTLY = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n"])


@st.composite
def steps(draw: st.DrawFn) -> bytes:
    """One step of a session, mostly well-formed so that deep states are reached."""
    kind = draw(st.integers(0, 11))
    end = draw(CRLF_MOSTLY)
    if kind == 0:
        return draw(st.sampled_from([b"EHLO client.test", b"HELO client.test", b"LHLO c"])) + end
    if kind in (1, 2, 3):  # a whole transaction, usually a good one
        return draw(transactions())
    if kind == 4:
        return b"RCPT TO:" + draw(ADDRESSES) + end
    if kind == 5:
        return draw(bdat_chunk())
    if kind == 6:
        return draw(COMMANDS) + end
    if kind == 7:
        return draw(NOISE)
    if kind == 8:
        return draw(st.sampled_from([b"RSET", b"NOOP", b"VRFY <a@b>", b"HELP", b"QUIT"])) + end
    if kind == 9:
        return draw(st.sampled_from([b"AUTH PLAIN AHVzZXIAc2VjcmV0", b"AUTH LOGIN"])) + end
    if kind == 10:
        return b"STARTTLS" + end
    return draw(BODIES)


GOOD_SENDERS = st.sampled_from(
    [b"<a@b.test>", b"<>", b"<a@b.test> SIZE=10", b"<a@b.test> BODY=8BITMIME"]
)
GOOD_RECIPIENTS = st.sampled_from([b"<r@b.test>", b"<s@b.test>", b"<x@b.test>", b"<postmaster>"])


@st.composite
def bdat_chunk(draw: st.DrawFn, last: bool | None = None) -> bytes:
    """A BDAT command and its chunk, usually of the size announced."""
    chunk = draw(BODIES)
    size = len(chunk) if draw(st.integers(0, 6)) else draw(st.integers(0, 40))
    if last is None:
        last = draw(st.booleans())
    return b"BDAT %d%s\r\n" % (size, b" LAST" if last else b"") + chunk


@st.composite
def transactions(draw: st.DrawFn) -> bytes:
    """MAIL, RCPTs, then a DATA body or BDAT chunks (or nothing): mostly well-formed."""
    mail = b"MAIL FROM:" + draw(GOOD_SENDERS | ADDRESSES) + draw(CRLF_MOSTLY)
    rcpts = b"".join(
        b"RCPT TO:" + draw(GOOD_RECIPIENTS | ADDRESSES) + draw(CRLF_MOSTLY)
        for _ in range(draw(st.integers(0, 4)))
    )
    how = draw(st.integers(0, 4))
    if how <= 1:
        terminator = draw(st.sampled_from([b"\r\n.\r\n"] * 6 + [b".\r\n", b"\n.\n", b""]))
        content = b"DATA\r\n" + draw(BODIES) + terminator
    elif how <= 3:
        chunks = draw(st.lists(bdat_chunk(last=False), max_size=3))
        content = b"".join(chunks) + draw(bdat_chunk(last=True))
    else:
        content = draw(st.sampled_from([b"RSET\r\n", b"QUIT\r\n", b""]))
    return mail + rcpts + content


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """A client's byte stream: a greeting most of the time, then steps."""
    first = draw(st.sampled_from([b"EHLO client.test\r\n"] * 3 + [b"HELO c\r\n", b""]))
    return first + b"".join(draw(st.lists(steps(), max_size=25)))


@st.composite
def engine_cases(draw: st.DrawFn) -> EngineCase:
    kwargs = {
        "pipelining": draw(st.booleans()),
        "chunking": draw(st.booleans()),
        "enhanced_status_codes": draw(st.booleans()),
        "dsn": draw(st.booleans()),
        "enable_SMTPUTF8": draw(st.booleans()),
        "decode_data": draw(st.booleans()),
        "auth_require_tls": False,
        "auth_required": draw(st.integers(0, 4)) == 0,
        "data_size_limit": draw(st.sampled_from([None, 0, 20, 33554432])),
        "max_recipients": draw(st.sampled_from([1, 3, 1000])),
        "command_call_limit": draw(st.sampled_from([None, 6, {"NOOP": 2}])),
        "soft_error_limit": draw(st.sampled_from([0, 0, 2, 10])),
        "hard_error_limit": draw(st.sampled_from([0, 0, 4, 20])),
        "junk_command_limit": draw(st.sampled_from([0, 0, 3, 100])),
        "error_sleep_time": 0.0005,
        "unknown_command_limit": draw(st.sampled_from([5, 2, 100])),
        "spool_threshold": draw(st.sampled_from([None, 0, 16, 1 << 20])),
        "body_budget": draw(st.sampled_from([None, 0, 40, 1 << 20])),
    }
    if kwargs["body_budget"] is not None:
        kwargs["body_budget"] = MemoryBudget(kwargs["body_budget"])
    stream = draw(streams())
    cuts = sorted(draw(st.lists(st.integers(0, max(0, len(stream))), max_size=8)))
    ops: list[tuple] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        if cut > start:
            ops.append(("data", stream[start:cut]))
            start = cut
        extra = draw(st.sampled_from([None, None, ("tick",), ("read", 1 << 20), ("read", 100)]))
        if extra is not None:
            ops.append(extra)
    if draw(st.booleans()):
        ops.append(("eof",))
    return EngineCase(kwargs, draw(st.booleans()), draw(st.integers(0, 9)) == 0, ops)


# -- the targets ---------------------------------------------------------------------------------

FRAMER_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("feed"), st.binary(max_size=64) | BODIES | streams()),
        st.tuples(
            st.just("data"), st.sampled_from([None, 0, 10, 100]), st.sampled_from([None, 1, 8])
        ),
        st.tuples(
            st.just("chunk"), st.integers(0, 40), st.booleans(), st.sampled_from([None, 1, 8])
        ),
        st.tuples(st.just("take")),
    ),
    max_size=40,
)


@FUZZ
@given(ops=FRAMER_OPS, max_command=st.sampled_from([8, 64, 512]), line_limit=st.integers(4, 80))
def test_fuzz_framer(ops: list[tuple], max_command: int, line_limit: int) -> None:
    assert run_framer(ops, max_command, line_limit) == []


@FUZZ
@given(case=engine_cases())
def test_fuzz_engine(case: EngineCase) -> None:
    assert run_engine(case) == []


# -- the checks themselves ---------------------------------------------------------------------


def test_the_engine_checks_catch_a_bad_reply_a_late_write_and_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fuzz targets are only as good as their checks: each one fires when it should."""
    from farm.smtp import SMTP
    from tests.support import fuzz_targets

    assert fuzz_targets._output_problems(b"220 hi\r\n250-a\r\n251 b\r\n") != []
    assert fuzz_targets._output_problems(b"220 hi\r\nok\r\n") != []
    assert fuzz_targets._output_problems(b"220 hi\r\n250 a\r\n") == []
    quit_then_write = EngineCase({}, False, False, [("data", b"QUIT\r\n")])
    original = SMTP.connection_lost

    def write_after_loss(self: SMTP, exc: Exception | None) -> None:
        transport = self.transport
        original(self, exc)
        transport.write(b"250 too late\r\n")

    monkeypatch.setattr(SMTP, "connection_lost", write_after_loss)
    assert run_engine(quit_then_write) == ["write after the connection was lost"]
    monkeypatch.undo()

    class Failing:
        async def handle_NOOP(self, *args: object) -> str:
            raise ZeroDivisionError

    problems = run_engine(EngineCase({}, True, False, [("data", b"NOOP\r\n")], Failing()))
    assert any("handler error" in problem for problem in problems), problems

    def broken(self: Framer, *args: object) -> None:
        raise ZeroDivisionError

    monkeypatch.setattr(Framer, "take_line", broken)  # (a lone command line's framing)
    with pytest.raises(ZeroDivisionError):
        run_engine(EngineCase({}, False, False, [("data", b"NOOP\r\n")]))


def test_the_framer_checks_catch_a_bad_event() -> None:
    from tests.support import fuzz_targets

    assert fuzz_targets._event_problems(Command(b"a\nb"), 512) != []
    assert fuzz_targets._event_problems(Chunk(b"abc", 2), 512) != []
    assert run_framer([("feed", b"EHLO x\r\n")], 512, 1000) == []
    chunk = [("chunk", 3, True, None), ("feed", b"abc")]
    assert run_framer(chunk, 512, 1000) == []
