"""The supervisor <-> worker messages (farm.supervisor.messages): every kind through its wire
format and through a real socketpair channel; bad lines are logged and dropped, never raised."""

from __future__ import annotations

import logging

import pytest

from farm.supervisor.channel import Channel, ChannelClosed
from farm.supervisor.messages import (
    Heartbeat,
    Kind,
    Message,
    Metrics,
    MetricsRequest,
    Ready,
    Recycle,
    decode,
    encode,
)
from tests.support.wait import wait_for

#: One message of every kind, with values at the edges of their types.
EVERY_KIND: list[Message] = [
    Ready(),
    Heartbeat(lag=0.0, sessions=0, messages=0),
    Heartbeat(lag=1.25, sessions=1024, messages=2**40),
    Recycle("max_messages"),
    Metrics(None, ""),
    Metrics(7, '# HELP farm_x x\nfarm_x{worker="1"} 1.0\n"quoted" \\ é\n'),
    MetricsRequest(1),
]


def test_every_kind_is_covered() -> None:
    assert {message.kind for message in EVERY_KIND} == set(Kind)


@pytest.mark.parametrize("message", EVERY_KIND, ids=repr)
def test_round_trip(message: Message) -> None:
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the text holds
    assert decode(line[:-1]) == message


def test_wire_format_is_compact_json_with_the_kind_under_t() -> None:
    assert encode(Heartbeat(0.5, 3, 120)) == b'{"t":"hb","lag":0.5,"sessions":3,"messages":120}\n'
    assert encode(MetricsRequest(9)) == b'{"t":"metrics?","id":9}\n'


def test_a_number_is_accepted_as_lag() -> None:
    assert decode(b'{"t":"hb","lag":2,"sessions":1,"messages":1}') == Heartbeat(2.0, 1, 1)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'{"t":"stop","graceful":true}', "unknown kind"),  # no longer a message: removed
        (b'{"t":"HB","lag":0,"sessions":0,"messages":0}', "unknown kind"),
        (b'{"lag":0,"sessions":0,"messages":0}', "unknown kind"),
        (b'{"t":["hb"]}', "unknown kind"),
        (b'{"t":null}', "unknown kind"),
        (b"not json", "not JSON"),
        (b'{"t":"hb"', "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"", "not JSON"),
        (b'["hb",0,0,0]', "not a JSON object"),
        (b'"ready"', "not a JSON object"),
        (b'{"t":"hb","lag":0,"sessions":0}', "no field 'messages'"),
        (b'{"t":"hb","lag":"0","sessions":0,"messages":0}', "'lag' is not a number"),
        (b'{"t":"hb","lag":true,"sessions":0,"messages":0}', "'lag' is not a number"),
        (b'{"t":"hb","lag":0,"sessions":1.5,"messages":0}', "'sessions' is not an integer"),
        (b'{"t":"hb","lag":0,"sessions":0,"messages":false}', "'messages' is not an integer"),
        (b'{"t":"recycle"}', "no field 'reason'"),
        (b'{"t":"recycle","reason":3}', "'reason' is not a string"),
        (b'{"t":"metrics","text":""}', "no field 'id'"),
        (b'{"t":"metrics","id":"1","text":""}', "'id' is not an integer"),
        (b'{"t":"metrics","id":1,"text":null}', "'text' is not a string"),
        (b'{"t":"metrics?"}', "no field 'id'"),
        (b'{"t":"metrics?","id":null}', "'id' is not an integer"),
    ],
)
def test_bad_line_is_logged_and_dropped(
    line: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="farm.supervisor.messages"):
        assert decode(line) is None
    [record] = caplog.records
    assert f"({why})" in record.getMessage()


def test_a_long_bad_line_is_logged_shortened(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="farm.supervisor.messages"):
        assert decode(b'{"t":"nope","pad":"' + b"x" * 100_000 + b'"}') is None
    assert len(caplog.records[0].getMessage()) < 400


def receive_all(channel: Channel, count: int) -> list[Message]:
    received: list[Message] = []

    def got_all() -> bool:
        received.extend(channel.receive())
        return len(received) >= count

    wait_for(got_all, f"{count} messages")
    return received


def test_every_kind_crosses_a_real_channel() -> None:
    supervisor, worker = Channel.pair()
    try:
        worker.send_many(EVERY_KIND)
        worker.send(Ready())
        assert receive_all(supervisor, len(EVERY_KIND) + 1) == [*EVERY_KIND, Ready()]
        supervisor.send(MetricsRequest(3))
        assert receive_all(worker, 1) == [MetricsRequest(3)]
    finally:
        supervisor.close()
        worker.close()


def test_channel_skips_a_bad_line_and_keeps_going(caplog: pytest.LogCaptureFixture) -> None:
    supervisor, worker = Channel.pair()
    try:
        worker.sock.sendall(b'{"t":"stop"}\n\x00garbage\n[]\n' + encode(Recycle("max_messages")))
        with caplog.at_level(logging.WARNING, logger="farm.supervisor.messages"):
            assert receive_all(supervisor, 1) == [Recycle("max_messages")]
        assert len(caplog.records) == 3
        worker.close()
        with pytest.raises(ChannelClosed):
            wait_for(lambda: supervisor.receive() or None, "end of file", timeout=10)
    finally:
        supervisor.close()
        worker.close()
