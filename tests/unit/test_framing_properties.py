"""Property tests of the sans-I/O Framer: chunking invariance, dot-stuffing round trip,
smuggling lookalikes, over-long lines and over-size bodies (bounded memory).

The Framer is driven exactly as the server drives it: feed bytes, drain ``next_event()``, and
call ``start_data()`` after a ``DATA`` command event.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from farm.smtp.framing import Command, CommandTooLong, DataError, Event, Framer, Message
from tests.support.smuggling import LOOKALIKES

MAX_COMMAND = 512
LINE_LIMIT = 1000
TERMINATOR = b"\r\n.\r\n"

SMUGGLED = (
    b"MAIL FROM:<smuggled@x>\r\nRCPT TO:<v@local>\r\nDATA\r\nFrom: smuggled@x\r\n\r\nsmuggled body"
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- driving the framer -------------------------------------------------------------------------


def run(
    chunks: Iterable[bytes],
    data_limit: int | None = None,
    max_command: int = MAX_COMMAND,
    *,
    max_buffered: list[int] | None = None,
) -> list[Event]:
    """Feed ``chunks`` one by one, draining events after each, as the server does."""
    framer = Framer(max_command, LINE_LIMIT)
    events: list[Event] = []
    for chunk in chunks:
        line = framer.take_line(chunk)  # the server's short cut for a lone command line
        if line is not None:
            events.append(Command(line))
            if line.upper() == b"DATA":
                framer.start_data(data_limit)
            if max_buffered is not None:
                max_buffered.append(framer.buffered)
            continue
        framer.feed(chunk)
        while (event := framer.next_event()) is not None:
            events.append(event)
            if isinstance(event, Command) and event.line.upper() == b"DATA":
                framer.start_data(data_limit)
        if max_buffered is not None:
            max_buffered.append(framer.buffered)
    return events


def split(stream: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def one_byte(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def stuff(lines: Sequence[bytes]) -> bytes:
    """Dot-stuff ``lines`` into a DATA body (each line CRLF-terminated), without terminator."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def unstuff(body: bytes) -> bytes:
    """The content of a raw body (ending in CRLF): drop the first dot of each CRLF line."""
    lines = body.split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


# -- a reference model of the framing rules, on the whole stream at once ------------------------


def reference(
    stream: bytes, data_limit: int | None, max_command: int = MAX_COMMAND
) -> tuple[list[Event], bool]:
    """The events the rules of engine.md give for ``stream``.

    Also returns whether the stream touches a known engine bug (none at present), so the
    general properties can skip those inputs if one is ever pinned again.
    """
    limit = data_limit or None
    events: list[Event] = []
    known_bug = False
    pos = 0
    in_data = False
    while True:
        if not in_data:
            lf = stream.find(b"\n", pos)
            if lf < 0:
                break
            raw = stream[pos:lf]
            line = raw.rstrip(b"\r")
            pos = lf + 1
            # The limit counts the line and one CR, whatever the reads: more CRs make it long.
            if len(line) > max_command or len(raw) > max_command + 1:
                events.append(CommandTooLong())
                continue
            events.append(Command(line))
            in_data = line.upper() == b"DATA"
            continue
        if stream.startswith(b".\r\n", pos):
            events.append(Message(b"", 0))
            pos += 3
            in_data = False
            continue
        end = stream.find(TERMINATOR, pos)
        if end < 0:
            break
        body = stream[pos : end + 2]
        pos = end + len(TERMINATOR)
        in_data = False
        lines = body.split(b"\r\n")[:-1]
        line_at = None  # offset in the body where the first over-long line became certain
        offset = 0
        for line in lines:
            if len(line) - line.startswith(b".") > LINE_LIMIT:
                line_at = offset + LINE_LIMIT + 2 + line.startswith(b".")
                break
            offset += len(line) + 2
        too_much = limit is not None and len(body) > limit
        too_long = line_at is not None
        if too_long and too_much:
            # Whichever error the stream shows first wins.
            too_much = limit + 1 < line_at  # type: ignore[operator]
            too_long = not too_much
        if too_much:
            events.append(Message(b"", len(body), DataError.TOO_MUCH_DATA))
        elif too_long:
            events.append(Message(b"", len(body), DataError.LINE_TOO_LONG))
        else:
            events.append(Message(unstuff(body), len(body)))
    return events, known_bug


# -- strategies ---------------------------------------------------------------------------------

_TOKENS = [
    b"DATA\r\n",
    b"data\n",
    b"NOOP\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"RCPT TO:<c@d>\r\n",
    b"QUIT\r\n",
    b".\r\n",
    b"..\r\n",
    TERMINATOR,
    b"\r\n",
    b"\r",
    b"\n",
    b".",
    b"\x00",
    b" ",
    b"body",
    b"\xff\xfe",
    *LOOKALIKES.values(),
]


_ENDINGS = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r\r\n"])
_COMMANDS = st.sampled_from(
    [b"NOOP", b"RSET", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"QUIT", b"", b".", b"data"]
)
#: Command line contents: known verbs, junk, and lengths around the command limit.
command_contents = st.one_of(
    _COMMANDS,
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")),
    st.integers(MAX_COMMAND - 3, MAX_COMMAND + 3).map(lambda n: b"z" * n),
    st.integers(MAX_COMMAND + 4, 3000).map(lambda n: b"w" * n),
)
#: Pieces of DATA bodies: lookalike terminators, dots, bare CR/LF, NUL, long lines.
body_tokens = st.one_of(
    st.sampled_from(_TOKENS),
    st.binary(max_size=12),
    st.tuples(st.sampled_from([b"", b"."]), st.integers(996, 1003)).map(
        lambda t: t[0] + b"y" * t[1] + b"\r\n"
    ),
    st.integers(20, 400).map(lambda n: b"v" * n),
)


@st.composite
def token_streams(draw: st.DrawFn) -> bytes:
    """Streams of command lines, DATA switches with bodies, and stray tokens."""
    parts: list[bytes] = []
    for kind in draw(st.lists(st.sampled_from("cdt"), max_size=12)):
        if kind == "c":
            line = draw(command_contents)
            if line.endswith(b"\r"):
                line += b"x"  # see test_bug_trailing_crs_split
            parts.append(line + draw(_ENDINGS))
        elif kind == "d":
            parts.append(b"DATA" + draw(_ENDINGS))
            parts.extend(draw(st.lists(body_tokens, max_size=12)))
            parts.append(draw(st.sampled_from([TERMINATOR, TERMINATOR, b".\r\n", b"\r\n."])))
        else:
            parts.extend(draw(st.lists(st.sampled_from(_TOKENS), max_size=4)))
    return b"".join(parts)


data_limits = st.one_of(st.none(), st.just(0), st.integers(1, 40), st.integers(900, 3000))


def cut_lists(stream: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, max(len(stream), 1)), max_size=30)


# -- chunking invariance ------------------------------------------------------------------------


@FAST
@given(stream=token_streams(), limit=data_limits, data=st.data())
def test_any_split_gives_the_same_events(
    stream: bytes, limit: int | None, data: st.DataObject
) -> None:
    expected, known_bug = reference(stream, limit)
    assume(not known_bug)
    assert run([stream], limit) == expected
    assert run(one_byte(stream), limit) == expected
    # Random chunks; after each one, the events so far are exactly those of the prefix fed:
    # an event comes out as soon as its last byte is in, never before.
    cuts = data.draw(cut_lists(stream), label="cuts")
    framer = Framer(MAX_COMMAND, LINE_LIMIT)
    seen: list[Event] = []
    fed = 0
    for chunk in split(stream, cuts):
        framer.feed(chunk)
        fed += len(chunk)
        while (event := framer.next_event()) is not None:
            seen.append(event)
            if isinstance(event, Command) and event.line.upper() == b"DATA":
                framer.start_data(limit)
        assert seen == reference(stream[:fed], limit)[0]
    assert seen == expected


# -- dot-stuffing round trip --------------------------------------------------------------------

_LINE_FRAGMENTS = st.sampled_from(
    [b".", b"..", b"\r", b"\n", b"\x00", b" ", b"a", b"body", b"\n.\n", b"\r.\r", b"\n.\r", b"\xe9"]
)
#: A content line: anything without the CRLF sequence (lines are split on CRLF only).
content_lines = (
    st.lists(st.one_of(_LINE_FRAGMENTS, st.binary(max_size=6)), max_size=8)
    .map(b"".join)
    .filter(lambda line: b"\r\n" not in line and not line.endswith(b"\r"))
)


@FAST
@given(lines=st.lists(content_lines, max_size=20), data=st.data())
def test_dot_stuffing_round_trip(lines: list[bytes], data: st.DataObject) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    stuffed = stuff(lines)
    stream = b"DATA\r\n" + stuffed + b".\r\nNOOP\r\n"
    expected = [Command(b"DATA"), Message(body, len(stuffed)), Command(b"NOOP")]
    cuts = data.draw(cut_lists(stream), label="cuts")
    assert run(split(stream, cuts)) == expected
    assert run(one_byte(stream)) == expected


@FAST
@given(lines=st.lists(st.binary(max_size=20), max_size=12), data=st.data())
def test_round_trip_with_trailing_cr_lines(lines: list[bytes], data: st.DataObject) -> None:
    """Lines ending in CR, holding bare CR/LF or NUL: whatever is not a CRLF stays content."""
    lines = [line.replace(b"\r\n", b"\r \n") for line in lines]
    body = b"".join(line + b"\r\n" for line in lines)
    # A line ending in CR followed by the CRLF re-splits the same way: still exact content.
    stuffed = stuff(body.split(b"\r\n")[:-1])
    stream = b"DATA\r\n" + stuffed + b".\r\n"
    cuts = data.draw(cut_lists(stream), label="cuts")
    events = run(split(stream, cuts))
    assert events == [Command(b"DATA"), Message(body, len(stuffed))]


# -- lookalike terminators are content ----------------------------------------------------------


@pytest.mark.parametrize("name", list(LOOKALIKES))
@FEW
@given(
    before=content_lines.filter(lambda b: not b.startswith(b".")),
    after=content_lines,
    data=st.data(),
)
def test_lookalike_terminator_never_ends_data(
    name: str, before: bytes, after: bytes, data: st.DataObject
) -> None:
    vector = LOOKALIKES[name]
    raw_body = b"Subject: t\r\n\r\n" + before + b"body" + vector + SMUGGLED + after + b"\r\n"
    stream = b"DATA\r\n" + raw_body + b".\r\nQUIT\r\n"
    cuts = data.draw(cut_lists(stream), label="cuts")
    for chunks in (split(stream, cuts), one_byte(stream)):
        events = run(chunks)
        assert events == [
            Command(b"DATA"),
            Message(unstuff(raw_body), len(raw_body)),
            Command(b"QUIT"),
        ]
        message = events[1]
        assert isinstance(message, Message)
        assert b"MAIL FROM:<smuggled@x>" in message.content
        assert not any(isinstance(e, Command) and b"smuggled" in e.line for e in events)


def test_v15_unstuffs_to_a_single_dot_line() -> None:
    raw = b"body" + LOOKALIKES["V15"] + b"more\r\n"
    events = run([b"DATA\r\n", raw, b".\r\n"])
    assert events == [Command(b"DATA"), Message(b"body\r\n.\r\nmore\r\n", len(raw))]


def test_v16_is_the_terminator() -> None:
    stream = b"DATA\r\nbody\r\n.\r\n" + SMUGGLED + b"\r\n.\r\n"
    events = run(one_byte(stream))
    assert events[:2] == [Command(b"DATA"), Message(b"body\r\n", 6)]
    assert Command(b"MAIL FROM:<smuggled@x>") in events
    assert len([e for e in events if isinstance(e, Message)]) == 2


# -- over-long DATA lines -----------------------------------------------------------------------


@FEW
@given(
    length=st.one_of(st.integers(1001, 1010), st.integers(1011, 200_000)),
    dot=st.booleans(),
    chunk=st.integers(1, 9000),
    tail=st.lists(content_lines, max_size=3),
)
def test_over_long_data_line_refused_after_terminator(
    length: int, dot: bool, chunk: int, tail: list[bytes]
) -> None:
    prefix = b"Subject: x\r\n\r\nfirst line\r\n"
    long_line = (b"." if dot else b"") + b"x" * length + b"\r\n"
    raw_body = prefix + long_line + stuff(tail)
    body_stream = raw_body + b".\r\nNOOP\r\n"
    chunk = max(chunk, len(body_stream) // 400)  # keep the example fast
    framer = Framer(MAX_COMMAND, LINE_LIMIT)
    framer.feed(b"DATA\r\n")
    assert framer.next_event() == Command(b"DATA")
    framer.start_data(None)
    # the error is certain once the long line has more than limit (+dot) octets before CRLF
    certain = len(prefix) + LINE_LIMIT + 1 + dot + 2
    events: list[Event] = []
    fed = 0
    for start in range(0, len(body_stream), chunk):
        piece = body_stream[start : start + chunk]
        framer.feed(piece)
        fed += len(piece)
        while (event := framer.next_event()) is not None:
            events.append(event)
        if fed < len(raw_body) + 3:  # the terminator's last byte not yet fed
            assert events == []
            assert framer.buffered <= len(prefix) + LINE_LIMIT + 4
            if fed >= certain:
                assert framer.buffered <= 4  # discarding: only a possible terminator prefix
    assert events == [
        Message(b"", len(raw_body), DataError.LINE_TOO_LONG),
        Command(b"NOOP"),
    ]


@pytest.mark.parametrize(
    ("line", "ok"),
    [
        (b"x" * 1000, True),
        (b"." + b"x" * 1000, True),  # a stuffing dot is not counted
        (b".." + b"x" * 999, True),
        (b"x" * 1001, False),
        (b"." + b"x" * 1001, False),
        (b"\r" * 1001, False),  # bare CRs are content octets
    ],
)
@pytest.mark.parametrize("pos", ["first", "middle", "last"])
def test_data_line_limit_boundaries(line: bytes, ok: bool, pos: str) -> None:
    lines = {"first": [line, b"b"], "middle": [b"a", line, b"b"], "last": [b"a", line]}[pos]
    raw = b"".join(x + b"\r\n" for x in lines)
    stream = b"DATA\r\n" + raw + b".\r\n"
    for chunks in ([stream], one_byte(stream)):
        events = run(chunks)
        if ok:
            assert events == [Command(b"DATA"), Message(unstuff(raw), len(raw))]
        else:
            assert events == [Command(b"DATA"), Message(b"", len(raw), DataError.LINE_TOO_LONG)]


# -- over-size bodies ---------------------------------------------------------------------------


@FEW
@given(
    limit=st.integers(1, 20_000),
    excess=st.integers(3, 100_000),
    chunk=st.integers(1, 9000),
)
def test_over_size_body_refused_after_terminator(limit: int, excess: int, chunk: int) -> None:
    size = limit + excess
    line = b"0123456789abcdef" * 6 + b"\r\n"
    raw_body = (line * (size // len(line) + 1))[: size - 2] + b"\r\n"
    body_stream = raw_body + b".\r\nRSET\r\n"
    chunk = max(chunk, len(body_stream) // 400)
    framer = Framer(MAX_COMMAND, LINE_LIMIT)
    framer.feed(b"DATA\r\n")
    assert framer.next_event() == Command(b"DATA")
    framer.start_data(limit)
    events: list[Event] = []
    fed = 0
    for start in range(0, len(body_stream), chunk):
        piece = body_stream[start : start + chunk]
        framer.feed(piece)
        fed += len(piece)
        while (event := framer.next_event()) is not None:
            events.append(event)
        if fed < len(raw_body) + 3:
            assert events == []
            assert framer.buffered <= limit + 3
            if fed > limit + 2:
                assert framer.buffered <= 4
    assert events == [Message(b"", len(raw_body), DataError.TOO_MUCH_DATA), Command(b"RSET")]


@pytest.mark.parametrize("limit", [2, 3, 10, 1000])
def test_body_at_the_size_limit_is_accepted_when_fed_whole(limit: int) -> None:
    raw = b"y" * (limit - 2) + b"\r\n"
    assert run([b"DATA\r\n" + raw + b".\r\n"], limit) == [Command(b"DATA"), Message(raw, limit)]
    over = b"y" + raw
    assert run([b"DATA\r\n" + over + b".\r\n"], limit) == [
        Command(b"DATA"),
        Message(b"", limit + 1, DataError.TOO_MUCH_DATA),
    ]


def test_empty_body() -> None:
    for chunks in ([b"DATA\r\n.\r\nNOOP\r\n"], one_byte(b"DATA\r\n.\r\nNOOP\r\n")):
        assert run(chunks, 5) == [Command(b"DATA"), Message(b"", 0), Command(b"NOOP")]
    # an empty first line, then the dot line: one empty content line
    assert run([b"DATA\r\n\r\n.\r\n"]) == [Command(b"DATA"), Message(b"\r\n", 2)]


# -- over-long command lines --------------------------------------------------------------------


@FAST
@given(
    length=st.one_of(st.integers(MAX_COMMAND + 1, MAX_COMMAND + 8), st.integers(600, 300_000)),
    ending=st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]),
    chunk=st.integers(1, 20_000),
    following=st.sampled_from([b"NOOP", b"RSET", b"MAIL FROM:<a@b>", b"x" * MAX_COMMAND]),
)
def test_over_long_command_is_one_error_and_next_line_intact(
    length: int, ending: bytes, chunk: int, following: bytes
) -> None:
    stream = b"A" * length + ending + following + b"\r\nQUIT\r\n"
    chunk = max(chunk, len(stream) // 400)
    sizes: list[int] = []
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    events = run(chunks, max_buffered=sizes)
    assert events == [CommandTooLong(), Command(following), Command(b"QUIT")]
    assert max(sizes) <= MAX_COMMAND + 3 + chunk


@pytest.mark.parametrize("ending", [b"\r\n", b"\n", b"\r\r\n"])
def test_command_limit_boundary(ending: bytes) -> None:
    # The limit counts the command and one CR: a second CR takes the room of a character.
    longest = MAX_COMMAND - max(0, ending.count(b"\r") - 1)
    ok = b"N" * longest + ending
    bad = b"N" * (longest + 1) + ending
    for stream in (ok + bad + b"NOOP\r\n",):
        for chunks in ([stream], one_byte(stream)):
            assert run(chunks) == [
                Command(b"N" * longest),
                CommandTooLong(),
                Command(b"NOOP"),
            ]


# -- once engine bugs, now fixed: split-invariance at the edges ---------------------------------


def test_trailing_crs_do_not_depend_on_split() -> None:
    stream = b"A" * MAX_COMMAND + b"\r\r\r\nNOOP\r\n"
    whole = run([stream])
    assert whole == [CommandTooLong(), Command(b"NOOP")]
    assert run(one_byte(stream)) == whole
    fits = b"A" * MAX_COMMAND + b"\r\nNOOP\r\n"
    assert run([fits]) == run(one_byte(fits)) == [Command(b"A" * MAX_COMMAND), Command(b"NOOP")]


@pytest.mark.parametrize("cut", [-1, -2])
def test_body_at_size_limit_split(cut: int) -> None:
    raw = b"12345678\r\n"  # 10 octets
    stream = b"DATA\r\n" + raw + b".\r\n"
    assert run([stream], 10) == [Command(b"DATA"), Message(raw, 10)]
    assert run([stream[:cut], stream[cut:]], 10) == [Command(b"DATA"), Message(raw, 10)]


def test_error_kind_does_not_depend_on_split() -> None:
    raw = b"x" * 1001 + b"\r\n" + b"y" * 600 + b"\r\n"
    stream = b"DATA\r\n" + raw + b".\r\n"
    whole = run([stream], 1500)
    split_after_long_line = run([stream[:1100], stream[1100:]], 1500)
    assert whole == split_after_long_line


# -- the lone-line short cut ------------------------------------------------------------------


@FAST
@given(
    before=st.sampled_from([b"", b"NOOP\r\n", b"x" * 600, b"DATA\r\n"]),
    data=st.one_of(
        st.binary(max_size=40),
        st.builds(
            lambda verb, arg, end: verb + arg + end,
            st.sampled_from([b"MAIL", b"rcpt", b"QUIT", b"", b"x" * 520]),
            st.binary(max_size=10),
            st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b"\r", b""]),
        ),
    ),
)
def test_take_line_is_what_next_event_gives(before: bytes, data: bytes) -> None:
    """``take_line`` answers only for a lone whole line with nothing pending (in command mode,
    not skipping an over-long line), and then exactly as feeding it would."""
    taker, feeder = Framer(MAX_COMMAND, LINE_LIMIT), Framer(MAX_COMMAND, LINE_LIMIT)
    for framer in (taker, feeder):
        framer.feed(before)
        while (event := framer.next_event()) is not None:
            if isinstance(event, Command) and event.line == b"DATA":
                framer.start_data(None)
    line = taker.take_line(data)
    feeder.feed(data)
    fed = []
    while (event := feeder.next_event()) is not None:
        fed.append(event)
    if line is None:
        return
    assert not before or before == b"NOOP\r\n"  # nothing pending, command mode
    assert fed == [Command(line)]
    assert taker.buffered == feeder.buffered == 0
