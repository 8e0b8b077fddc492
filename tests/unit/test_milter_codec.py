"""The milter codec fuzzed with hypothesis, and the client against scripted milter peers.

Real milters (rspamd's proxy, OpenDKIM) are in test_scan_clients.py; they never send what
these peers send: broken lengths, edits they did not negotiate, progress packets, every edit
kind, opt-outs of steps and replies. A scripted peer is the way to make a milter misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.scan import milter_codec as mc
from farm.scan.errors import ScanError
from farm.scan.message import MessageEdit, header_field
from farm.scan.milter import MilterClient, parse_milter_address
from farm.scan.replies import checked_reply
from farm.scan.verdict import ScanContext, Verdict

codes = st.sampled_from([bytes([c]) for c in b"+-24abcdefhimpqrsty"]) | st.binary(
    min_size=1, max_size=1
)


@given(st.lists(st.tuples(codes, st.binary(max_size=300)), max_size=8), st.data())
def test_packets_survive_any_split(packets: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
    stream = b"".join(mc.encode(code, payload) for code, payload in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader = mc.PacketReader()
    out = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += reader.feed(stream[start:cut])
        start = cut
    assert out == packets and reader.pending == 0


@given(st.binary(max_size=64))
def test_a_bad_stream_is_a_protocol_error_or_waits(stream: bytes) -> None:
    reader = mc.PacketReader(max_packet=1024)
    try:
        packets = reader.feed(stream)
    except mc.MilterProtocolError:
        return
    for code, data in packets:
        with contextlib.suppress(mc.MilterProtocolError):
            mc.parse_reply(code, data)


@given(codes, st.binary(max_size=80))
def test_any_reply_parses_or_is_refused(code: bytes, data: bytes) -> None:
    try:
        reply = mc.parse_reply(code, data)
    except mc.MilterProtocolError:
        return
    assert reply.code == code


@given(st.binary(max_size=80))
def test_any_options_reply_parses_or_is_refused(data: bytes) -> None:
    try:
        options = mc.parse_options(mc.OPTNEG, data)
    except mc.MilterProtocolError:
        return
    assert set(options.macros) <= set(mc.MACRO_STAGES.values())


@given(st.binary(max_size=200), st.booleans())
def test_a_scanners_header_value_cannot_add_fields(value: bytes, lead: bool) -> None:
    """Whatever bytes a milter sends as a value, the header block keeps one new field."""
    raw = b"Subject: x\r\n\r\nbody\r\n"
    message = MessageEdit(raw)
    try:
        message.add(b"X-Test", value, lead)
    except ValueError:
        assert b"\x00" in value
        return
    out = message.content()
    head, body = out.split(b"\r\n\r\n", 1)
    assert body == b"body\r\n"
    lines = head.split(b"\r\n")
    starts = [line for line in lines if line[:1] not in (b" ", b"\t")]
    assert [s.split(b":")[0] for s in starts] == [b"Subject", b"X-Test"]
    assert b"\r" not in head.replace(b"\r\n", b"") and b"\n" not in head.replace(b"\r\n", b"")


@given(st.text(max_size=120))
def test_checked_reply_only_passes_4xx_5xx_with_enhanced_codes(text: str) -> None:
    reply = checked_reply(text)
    if reply is not None:
        for line in reply.split("\r\n"):
            assert line[0] in "45" and line[4] == line[0] and line[:3] == reply[:3]


def test_checked_reply_examples() -> None:
    assert checked_reply("550 5.7.1 Go away") == "550 5.7.1 Go away"
    assert checked_reply("451-4.7.1 one\r\n451 4.7.1 two") == "451-4.7.1 one\r\n451 4.7.1 two"
    assert checked_reply("250 2.0.0 ok") is None
    assert checked_reply("550 4.7.1 mixed class") is None
    assert checked_reply("550 Go away") is None  # Postfix wants the enhanced code too
    assert checked_reply("550 5.7.1 100%% sure") == "550 5.7.1 100% sure"


def test_header_field_folds_with_crlf() -> None:
    assert header_field(b"X-A", b"one\n two\nthree") == b"X-A: one\r\n two\r\n\tthree\r\n"
    with pytest.raises(ValueError):
        header_field(b"Bad:Name", b"v")


def test_milter_addresses() -> None:
    assert parse_milter_address("inet:127.0.0.1:11332") == ("inet", "127.0.0.1", 11332)
    assert parse_milter_address("inet:[::1]:8891") == ("inet", "::1", 8891)
    assert parse_milter_address("unix:/run/m.sock") == ("unix", "/run/m.sock", 0)
    for bad in ("tcp:1.2.3.4:5", "inet:host", "inet:host:0", "unix:", "nonsense"):
        with pytest.raises(ValueError):
            parse_milter_address(bad)


# -- scripted milter peers --------------------------------------------------------------------

Script = Callable[[bytes, bytes], list[bytes]]


def options(actions: int = mc.ALL_ACTIONS, protocol: int = 0, version: int = 6) -> bytes:
    return mc.encode(mc.OPTNEG, struct.pack("!III", version, actions, protocol))


def cont() -> list[bytes]:
    return [mc.encode(mc.CONTINUE)]


def run_against(script: Script, raw: bytes | None = None) -> tuple[Verdict, ScanContext, list]:
    """Scan one message with a peer that answers each command with ``script(code, data)``."""
    seen: list[tuple[bytes, bytes]] = []

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        packets = mc.PacketReader()
        try:
            while data := await reader.read(65536):
                for code, payload in packets.feed(data):
                    seen.append((code, payload))
                    for packet in script(code, payload):
                        writer.write(packet)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def main() -> tuple[Verdict, ScanContext]:
        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ctx = ScanContext(
            MessageEdit(raw or b"Subject: s\r\nX-Old: 1\r\nX-Old: 2\r\n\r\nbody\r\n"),
            mail_from="a@example.com",
            rcpt_tos=["b@example.org", "c@example.org"],
            client_address="127.0.0.2",
            helo="h.example",
        )
        try:
            async with asyncio.timeout(20):
                return await MilterClient(f"inet:127.0.0.1:{port}").scan(ctx), ctx
        finally:
            server.close()

    verdict, ctx = asyncio.run(main())
    return verdict, ctx, seen


def standard(at_eom: list[bytes], protocol: int = 0, actions: int = mc.ALL_ACTIONS) -> Script:
    def script(code: bytes, data: bytes) -> list[bytes]:
        if code == mc.OPTNEG:
            return [options(actions, protocol)]
        if code == mc.BODYEOB:
            return at_eom
        if code in (mc.MACRO, mc.QUIT, mc.ABORT):
            return []
        if code == mc.HEADER and protocol & mc.P_NR_HDR:
            return []
        return cont()

    return script


def test_every_edit_is_applied() -> None:
    edits = [
        mc.encode(mc.PROGRESS),
        mc.encode_strings(mc.ADDHEADER, b"X-Added", b"yes"),
        mc.encode(mc.INSHEADER, struct.pack("!I", 0), b"X-Top\x00first\x00"),
        mc.encode(mc.CHGHEADER, struct.pack("!I", 2), b"X-Old\x00\x00"),  # delete the 2nd
        mc.encode(mc.CHGHEADER, struct.pack("!I", 1), b"Subject\x00new\x00"),
        mc.encode_strings(mc.CHGFROM, b"<new@example.com>", b"BODY=8BITMIME"),
        mc.encode_strings(mc.ADDRCPT, b"<d@example.org>"),
        mc.encode_strings(mc.DELRCPT, b"<B@example.org>"),
        mc.encode(mc.REPLBODY, b"new body\n"),
        mc.encode(mc.REPLBODY, b"line two\n"),
        mc.encode_strings(mc.QUARANTINE, b"looks odd"),
        mc.encode(mc.CONTINUE),
    ]
    verdict, ctx, _ = run_against(standard(edits))
    assert verdict.action == "quarantine" and ctx.quarantine == "looks odd"
    assert ctx.message.content() == (
        b"X-Top: first\r\nSubject: new\r\nX-Old: 1\r\nX-Added: yes\r\n\r\nnew body\r\nline two\r\n"
    )
    assert ctx.mail_from == "new@example.com" and ctx.mail_options == ["BODY=8BITMIME"]
    assert ctx.rcpt_tos == ["c@example.org", "d@example.org"]


def test_the_conversation_follows_the_negotiated_steps() -> None:
    """NOHELO/NOBODY skip steps, NR_HDR means no reply is awaited per header; macros sent."""
    protocol = mc.P_NOHELO | mc.P_NOBODY | mc.P_NR_HDR
    verdict, _, seen = run_against(standard(cont(), protocol))
    assert verdict.action == "accept"
    commands = [code for code, _ in seen if code != mc.MACRO]
    assert commands == [
        mc.OPTNEG, mc.CONNECT, mc.MAIL, mc.RCPT, mc.RCPT, mc.DATA,
        mc.HEADER, mc.HEADER, mc.HEADER, mc.EOH, mc.BODYEOB, mc.QUIT,
    ]  # fmt: skip
    connect = next(data for code, data in seen if code == mc.CONNECT)
    assert connect == b"unknown\x004" + struct.pack("!H", 0) + b"127.0.0.2\x00"
    macros = [data for code, data in seen if code == mc.MACRO]
    assert any(m.startswith(b"M") and b"{mail_addr}\x00a@example.com\x00" in m for m in macros)


def test_a_version_2_milter_gets_no_data_command() -> None:
    def script(code: bytes, data: bytes) -> list[bytes]:
        if code == mc.OPTNEG:
            return [options(mc.F_ADDHDRS, 0, version=2)]
        return standard(cont())(code, data)

    verdict, _, seen = run_against(script)
    assert verdict.action == "accept"
    commands = [code for code, _ in seen]
    assert mc.DATA not in commands and mc.EOH in commands and mc.BODY in commands


def test_a_recipient_rejected_refuses_the_message() -> None:
    def script(code: bytes, data: bytes) -> list[bytes]:
        if code == mc.RCPT and b"c@" in data:
            return [mc.encode_strings(mc.REPLYCODE, b"550 5.1.1 No such user")]
        return standard(cont())(code, data)

    verdict, _, seen = run_against(script)
    assert verdict == Verdict("reject", "550 5.1.1 No such user", "at RCPT")
    assert mc.BODYEOB not in [code for code, _ in seen]


@pytest.mark.parametrize(
    ("answer", "action", "reply"),
    [
        (mc.encode(mc.REJECT), "reject", "550 5.7.1 Command rejected"),
        (mc.encode(mc.TEMPFAIL), "tempfail", "451 4.7.1 Service unavailable - try again later"),
        (mc.encode(mc.DISCARD), "discard", None),
        (mc.encode(mc.ACCEPT), "accept", None),
    ],
)
def test_final_answers(answer: bytes, action: str, reply: str | None) -> None:
    verdict, _, _ = run_against(standard([answer]))
    assert (verdict.action, verdict.reply) == (action, reply)


def test_skip_stops_the_body() -> None:
    def script(code: bytes, data: bytes) -> list[bytes]:
        if code == mc.BODY:
            return [mc.encode(mc.SKIP)]
        return standard(cont(), mc.P_SKIP)(code, data)

    body = b"x" * 200_000 + b"\r\n"
    verdict, _, seen = run_against(script, b"Subject: s\r\n\r\n" + body)
    assert verdict.action == "accept"
    assert [code for code, _ in seen].count(mc.BODY) == 1


@pytest.mark.parametrize(
    ("at_eom", "actions", "error"),
    [
        ([b"\x00\x00\x00\x00"], mc.ALL_ACTIONS, "bad packet length 0"),
        ([mc.encode_strings(mc.ADDHEADER, b"X-A", b"1")], 0, "not negotiated"),
        ([mc.encode_strings(mc.REPLYCODE, b"250 2.0.0 fine")], mc.ALL_ACTIONS, "malformed reply"),
        ([mc.encode(b"Z")], mc.ALL_ACTIONS, "unknown reply code"),
        ([mc.encode_strings(mc.ADDHEADER, b"Bad:Name", b"1"), mc.encode(mc.CONTINUE)], 1, "bad"),
        ([], mc.ALL_ACTIONS, "closed"),
    ],
)
def test_a_broken_milter_is_an_error(at_eom: list[bytes], actions: int, error: str) -> None:
    def script(code: bytes, data: bytes) -> list[bytes]:
        if code == mc.BODYEOB and not at_eom:
            raise ConnectionResetError  # the peer hangs up instead of answering
        return standard(at_eom, actions=actions)(code, data)

    with pytest.raises(ScanError, match=error):
        run_against(script)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(codes, st.binary(max_size=40)), max_size=6))
def test_any_end_of_message_answer_gives_a_verdict_or_a_scan_error(
    answers: list[tuple[bytes, bytes]],
) -> None:
    packets = [mc.encode(code, data) for code, data in answers]
    try:
        verdict, _, _ = run_against(standard([*packets, mc.encode(mc.CONTINUE)]))
    except ScanError:
        return
    assert verdict.action in ("accept", "reject", "tempfail", "discard", "quarantine")
