"""``farm.relay.Relay`` against Postfix's ``smtp-sink`` as the next hop.

Each test starts its own ``smtp-sink`` on a free loopback port (stopped by pid at teardown),
with every transaction dumped to a file, so delivery is checked byte for byte and counted.
"""

from __future__ import annotations

import asyncio
import email.policy
import ipaddress
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email.parser import BytesHeaderParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from farm.controller import Controller
from farm.lmtp import LMTP
from farm.relay import RELAY_DENIED, Relay, clean_content, dot_stuff
from farm.smtp import SMTP
from tests.conftest import free_port

SMTP_SINK = "/usr/sbin/smtp-sink"
SWAKS = shutil.which("swaks")

pytestmark = pytest.mark.skipif(not os.path.exists(SMTP_SINK), reason="smtp-sink not installed")

DOMAIN = "farm.test"
WAIT = 10.0


class Sink:
    """One running ``smtp-sink``; ``dump`` collects every transaction it received."""

    def __init__(self, args: list[str], directory: Path) -> None:
        self.port = free_port()
        self.dump = directory / "dump"
        command = [SMTP_SINK, "-h", "sink.test", "-D", str(self.dump), *args]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        command += [f"127.0.0.1:{self.port}", "16"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {self.process.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("smtp-sink did not start listening")

    @property
    def next_hop(self) -> str:
        return f"127.0.0.1:{self.port}"

    def text(self) -> bytes:
        return self.dump.read_bytes() if self.dump.exists() else b""

    def wait_for(self, marker: bytes) -> bytes:
        """The dump once it holds ``marker`` (bounded wait; the sink writes it on ``.``)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            data = self.text()
            if marker in data:
                return data
            time.sleep(0.02)
        raise AssertionError(f"{marker!r} never reached the next hop; dump: {self.text()!r}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def sink() -> Iterator[Callable[..., Sink]]:
    """Factory: ``sink(*smtp_sink_options)`` -> a started ``Sink``; all stopped at teardown."""
    started: list[Sink] = []
    # Not under tmp_path: smtp-sink drops to ``nobody``, which cannot enter pytest's 0700 dirs.
    directory = Path(tempfile.mkdtemp(prefix="farm-relay-sink-"))
    directory.chmod(0o1777)

    def start(*args: str) -> Sink:
        instance = Sink(list(args), directory)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()
    shutil.rmtree(directory, ignore_errors=True)


def relay(next_hop: str, **kwargs: Any) -> Relay:
    kwargs.setdefault("domains", [DOMAIN, ".sub.farm.test"])
    kwargs.setdefault("trusted_networks", ["10.0.0.0/8"])  # 127.0.0.1 is untrusted
    kwargs.setdefault("timeout", 5.0)
    return Relay(next_hop, **kwargs)


def message(marker: str, body: str = "hello") -> bytes:
    return (
        f"From: a@ext.test\r\nTo: r@{DOMAIN}\r\nSubject: {marker}\r\n\r\n{body}\r\n{marker}\r\n"
    ).encode()


def send(port: int, rcpts: list[str], data: bytes, sender: str = "a@ext.test") -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        return client.sendmail(sender, rcpts, data)


def data_reply(port: int, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    """The reply to the end of data (or to DATA), via smtplib's low-level commands."""
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.ehlo("client.test")
        assert client.mail("a@ext.test")[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        return client.data(data)


# -- normal delivery ---------------------------------------------------------------------------


def test_delivery_arrives_once_with_received_header(make_controller: Any, sink: Any) -> None:
    next_hop = sink()
    controller = make_controller(relay(next_hop.next_hop))
    marker = f"relay-{uuid.uuid4().hex}"
    refused = send(controller.port, [f"r@{DOMAIN}"], message(marker, "body line one"))
    assert refused == {}
    dump = next_hop.wait_for(marker.encode() + b"\n")
    assert dump.count(f"Subject: {marker}".encode()) == 1
    assert b"body line one" in dump
    ours = [line for line in dump.split(b"\n") if b"(farm)" in line]
    assert len(ours) == 1
    assert b"by farm.test (farm) with ESMTP" in ours[0]
    text = dump.decode()
    received = text[text.index("Received: from", text.index("X-Rcpt-Args")) :]
    received = received[received.index("Received: from", 1) :]  # skip smtp-sink's own
    assert received.startswith("Received: from ")
    assert "([127.0.0.1])" in received.split("\n")[0]
    assert f"for <r@{DOMAIN}>;" in received
    assert "X-Rcpt-Args: <r@farm.test>" in text
    # Our header comes right before the sender's, which arrive unchanged.
    assert received.index("From: a@ext.test") < received.index(marker)


def test_swaks_delivery_and_subdomain(make_controller: Any, sink: Any) -> None:
    if SWAKS is None:
        pytest.skip("swaks not installed")
    next_hop = sink()
    controller = make_controller(relay(next_hop.next_hop))
    marker = f"swaks-{uuid.uuid4().hex}"
    result = subprocess.run(
        [
            SWAKS,
            "--server",
            f"127.0.0.1:{controller.port}",
            "--helo",
            "swaks.client.test",
            "--from",
            "a@ext.test",
            "--to",
            "R@Deep.Sub.FARM.test,s@farm.test",
            "--header",
            f"Subject: {marker}",
            "--body",
            "swaks body",
            "--timeout",
            "10",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    dump = next_hop.wait_for(marker.encode())
    assert dump.count(f"Subject: {marker}".encode()) == 1
    assert b"Received: from swaks.client.test ([127.0.0.1])" in dump
    assert b"X-Rcpt-Args: <R@Deep.Sub.FARM.test>" in dump
    assert b"X-Rcpt-Args: <s@farm.test>" in dump


def test_lmtp_next_hop(make_controller: Any, sink: Any) -> None:
    next_hop = sink("-L")
    controller = make_controller(relay(next_hop.next_hop, lmtp=True))
    marker = f"lmtp-{uuid.uuid4().hex}"
    assert send(controller.port, [f"r@{DOMAIN}", f"s@{DOMAIN}"], message(marker)) == {}
    dump = next_hop.wait_for(marker.encode())
    assert b"X-Client-Proto: LMTP" in dump
    assert dump.count(f"Subject: {marker}".encode()) == 1


def test_lmtp_front_end_gets_one_reply_per_recipient(sink: Any) -> None:
    next_hop = sink()

    class LMTPController(Controller):
        def factory(self) -> SMTP:
            return LMTP(self.handler, **self.SMTP_kwargs)

    controller = LMTPController(
        relay(next_hop.next_hop), hostname="127.0.0.1", port=0, server_hostname="farm.test"
    )
    controller.start()
    try:
        # smtplib.LMTP reads only one reply after the data, so the dialogue is done by hand.
        with socket.create_connection(("127.0.0.1", controller.port), timeout=WAIT) as raw:
            stream = raw.makefile("rb")
            assert stream.readline().startswith(b"220")
            raw.sendall(b"LHLO client.test\r\n")
            while not stream.readline().startswith(b"250 "):
                pass
            raw.sendall(b"MAIL FROM:<a@ext.test>\r\n")
            assert stream.readline().startswith(b"250")
            for rcpt in (f"r@{DOMAIN}", "r@ext.test", f"s@{DOMAIN}"):
                raw.sendall(f"RCPT TO:<{rcpt}>\r\n".encode())
                assert stream.readline()[:3] == (b"550" if "ext" in rcpt else b"250")
            raw.sendall(b"DATA\r\n")
            assert stream.readline().startswith(b"354")
            raw.sendall(message("x") + b".\r\n")
            replies = [stream.readline(), stream.readline()]
            raw.sendall(b"QUIT\r\n")
            assert stream.readline().startswith(b"221")
        assert all(reply.startswith(b"250 ") for reply in replies), replies
    finally:
        controller.stop()
    next_hop.wait_for(b"Subject: x")


# -- policy ------------------------------------------------------------------------------------

SENDERS = ["<>", "<a@ext.test>", f"<a@{DOMAIN}>", "<a@[127.0.0.1]>"]
#: nmap's smtp-open-relay recipients, with ext.test as the foreign domain, plus the
#: relay-domain confusions of security notes 6.1 items 30-31.
PROBES = [
    "<r@ext.test>",
    "<r%ext.test@[127.0.0.1]>",
    f"<r%ext.test@{DOMAIN}>",
    '<"r@ext.test">',
    '<"r%ext.test">',
    "<r@ext.test@[127.0.0.1]>",
    '<"r@ext.test"@[127.0.0.1]>',
    f"<r@ext.test@{DOMAIN}>",
    "<@[127.0.0.1]:r@ext.test>",
    f"<@{DOMAIN}:r@ext.test>",
    "<ext.test!r>",
    "<ext.test!r@[127.0.0.1]>",
    f"<ext.test!r@{DOMAIN}>",
    '<"ext.test!r"@farm.test>',
    '<"r%ext.test"@farm.test>',
    "<r@EXT.test>",
    "<r@ext.test.>",
    "<r@farm.test.ext.test>",
    "<r@xfarm.test>",
    "<r@sub.farm.test>",  # only *under* .sub.farm.test is ours
    "<r@[IPv6:::1]>",
    "<r@[IPv6:::ffff:127.0.0.1]>",
    "<r@[10.1.2.3]>",
]


def test_open_relay_probes_from_untrusted_client_get_no_2xx(
    make_controller: Any, sink: Any
) -> None:
    next_hop = sink()
    controller = make_controller(relay(next_hop.next_hop))
    accepted = []
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("probe.test")
        for sender in SENDERS:
            for probe in PROBES:
                client.rset()
                client.putcmd("MAIL", f"FROM:{sender}")
                assert client.getreply()[0] == 250
                client.putcmd("RCPT", f"TO:{probe}")
                code, text = client.getreply()
                if 200 <= code <= 299:
                    accepted.append((sender, probe))
                else:
                    assert code in (550, 553, 501), (probe, code, text)
        client.rset()
        client.mail("a@ext.test")
        assert client.rcpt("r@ext.test") == (550, RELAY_DENIED[4:].encode())
        assert client.docmd("DATA")[0] == 503
    assert accepted == []
    assert next_hop.text() == b""


def test_policy_decisions() -> None:
    handler = relay("127.0.0.1:1", domains=["Farm.Test.", ".sub.farm.test", "[192.0.2.7]"])
    untrusted = SimpleNamespace(peer=("127.0.0.1", 1), proxy_data=None, authenticated=False)
    for ours in ("r@farm.test", "r@FARM.TEST.", "r@a.sub.farm.test", "r@[192.0.2.7]", "postmaster"):
        assert handler.check_recipient(untrusted, ours) is None, ours
    refusals = {
        "r@ext.test": "foreign domain",
        "r@sub.farm.test": "foreign domain",
        "r@[192.0.2.8]": "foreign IP literal",
        "nobody": "no domain",
    }
    for foreign, why in refusals.items():
        assert handler.check_recipient(untrusted, foreign) == why, foreign
    trusted = SimpleNamespace(peer=("10.9.8.7", 1), proxy_data=None, authenticated=False)
    assert handler.check_recipient(trusted, "r@ext.test") is None
    authenticated = SimpleNamespace(peer=("127.0.0.1", 1), proxy_data=None, authenticated=True)
    assert handler.check_recipient(authenticated, "r@ext.test") is None
    mapped = SimpleNamespace(peer=("::ffff:10.0.0.1", 1, 0, 0), proxy_data=None)
    assert handler.is_trusted(mapped)
    # A valid PROXY source replaces the peer, both ways.
    proxied = SimpleNamespace(
        peer=("10.0.0.1", 1),
        proxy_data=SimpleNamespace(valid=True, src_addr=ipaddress.ip_address("198.51.100.1")),
    )
    assert not handler.is_trusted(proxied)
    proxied.proxy_data.valid = False
    assert handler.is_trusted(proxied)
    # The probe forms are refused even for trusted and authenticated clients.
    for session in (trusted, authenticated):
        for probe in (
            "r%ext.test@farm.test",
            "ext.test!r",
            '"r@ext.test"@farm.test',
            "r@[10.0.0.1]",
        ):
            assert handler.check_recipient(session, probe) is not None, probe


def test_trusted_network_may_relay(make_controller: Any, sink: Any) -> None:
    next_hop = sink()
    controller = make_controller(relay(next_hop.next_hop, trusted_networks=["127.0.0.0/8"]))
    marker = f"trusted-{uuid.uuid4().hex}"
    assert send(controller.port, ["r@ext.test"], message(marker)) == {}
    dump = next_hop.wait_for(marker.encode())
    assert b"X-Rcpt-Args: <r@ext.test>" in dump
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        client.mail("a@ext.test")
        assert client.rcpt(f"r%ext.test@{DOMAIN}")[0] == 550


# -- next hop failures -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["MAIL", "RCPT", "DATA", "."])
def test_next_hop_rejects(make_controller: Any, sink: Any, command: str) -> None:
    next_hop = sink("-f", command)
    controller = make_controller(relay(next_hop.next_hop))
    code, _ = data_reply(controller.port, [f"r@{DOMAIN}"], message("rejected"))
    assert 500 <= code <= 599
    assert b"Subject: rejected" not in next_hop.text() or command == "."


@pytest.mark.parametrize("command", ["MAIL", "RCPT", "DATA", "."])
def test_next_hop_temp_fails(make_controller: Any, sink: Any, command: str) -> None:
    next_hop = sink("-r", command)
    controller = make_controller(relay(next_hop.next_hop))
    code, _ = data_reply(controller.port, [f"r@{DOMAIN}"], message("deferred"))
    assert 400 <= code <= 499


@pytest.mark.parametrize("command", ["CONNECT", "EHLO", "RCPT", "."])
def test_next_hop_drops_with_421(make_controller: Any, sink: Any, command: str) -> None:
    next_hop = sink("-Q", command)
    controller = make_controller(relay(next_hop.next_hop))
    code, text = data_reply(controller.port, [f"r@{DOMAIN}"], message("dropped"))
    assert code == 451, text


def test_some_recipients_refused_still_250(make_controller: Any, caplog: Any) -> None:
    """A next hop that refuses one of two recipients: 250 to the sender, the refusal logged."""
    seen: list[bytes] = []
    ready = threading.Event()
    port_box: list[int] = []

    async def serve(stop: asyncio.Event) -> None:
        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 fake\r\n")
            while line := await reader.readline():
                seen.append(line)
                verb = line[:4].upper()
                if verb == b"RCPT":
                    ok = b"good" in line
                    writer.write(b"250 ok\r\n" if ok else b"550 5.1.1 no such user\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    while (body := await reader.readline()) != b".\r\n":
                        seen.append(body)
                    writer.write(b"250 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
            writer.close()

        server = await asyncio.start_server(session, "127.0.0.1", 0)
        port_box.append(server.sockets[0].getsockname()[1])
        ready.set()
        await stop.wait()
        server.close()

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(stop),), daemon=True)
    thread.start()
    try:
        assert ready.wait(WAIT)
        controller = make_controller(relay(f"127.0.0.1:{port_box[0]}"))
        with caplog.at_level("INFO", logger="farm.relay"):
            code, _ = data_reply(controller.port, [f"good@{DOMAIN}", f"bad@{DOMAIN}"], b"x\r\n")
        assert code == 250
        lines = [r.getMessage() for r in caplog.records if r.name == "farm.relay"]
        assert any("refused=1" in m and "bad@farm.test" in m for m in lines), lines
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(WAIT)
        loop.close()


def test_next_hop_down(make_controller: Any, caplog: Any) -> None:
    controller = make_controller(relay(f"127.0.0.1:{free_port()}"))
    with caplog.at_level("INFO", logger="farm.relay"):
        code, text = data_reply(controller.port, [f"r@{DOMAIN}"], message("down"))
    assert (code, text) == (451, b"4.4.1 Next hop unavailable, try again later")
    records = [r for r in caplog.records if r.name == "farm.relay"]
    assert len(records) == 1
    assert records[0].exc_info is None and "error=ConnectionRefusedError" in records[0].getMessage()


def test_next_hop_hangs_at_data(make_controller: Any, sink: Any) -> None:
    next_hop = sink("-w", "30")
    controller = make_controller(relay(next_hop.next_hop, timeout=2.0))
    started = time.monotonic()
    code, text = data_reply(controller.port, [f"r@{DOMAIN}"], message("hang"))
    elapsed = time.monotonic() - started
    assert code == 451, text
    assert elapsed < 2.0 + 3.0


def test_next_hop_never_greets(make_controller: Any) -> None:
    with socket.socket() as listener:  # accepts in the kernel backlog, never says a word
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        controller = make_controller(relay(f"127.0.0.1:{port}", timeout=1.0))
        started = time.monotonic()
        code, text = data_reply(controller.port, [f"r@{DOMAIN}"], message("mute"))
        assert code == 451 and text.startswith(b"4.4.2"), text
        assert time.monotonic() - started < 1.0 + 3.0


# -- content -----------------------------------------------------------------------------------


def test_stray_line_ends_never_reach_next_hop(make_controller: Any, sink: Any) -> None:
    next_hop = sink()
    controller = make_controller(relay(next_hop.next_hop))
    marker = f"stray-{uuid.uuid4().hex}"
    body = (
        f"Subject: {marker}\r\n\r\n"
        "lf-before\nlf-after\r\n"
        "cr-before\rcr-after\r\n"
        "nul-before\x00nul-after\r\n"
        "smuggle\n.\nMAIL FROM:<evil@ext.test>\r\n"
        "..leading dot\r\n"  # the client's dot-stuffing of ".leading dot"
        f"end-{marker}\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", controller.port), timeout=WAIT) as raw:
        stream = raw.makefile("rb")
        assert stream.readline().startswith(b"220")
        raw.sendall(b"HELO raw.test\r\n")
        assert stream.readline().startswith(b"250")
        raw.sendall(b"MAIL FROM:<a@ext.test>\r\n")
        assert stream.readline().startswith(b"250")
        raw.sendall(f"RCPT TO:<r@{DOMAIN}>\r\n".encode())
        assert stream.readline().startswith(b"250")
        raw.sendall(b"DATA\r\n")
        assert stream.readline().startswith(b"354")
        raw.sendall(body + b".\r\n")
        reply = stream.readline()
        raw.sendall(b"QUIT\r\n")
    if not reply.startswith(b"250"):  # the engine may refuse such content outright: also fine
        assert reply[:1] in (b"4", b"5")
        assert marker.encode() not in next_hop.text()
        return
    dump = next_hop.wait_for(f"end-{marker}".encode())
    assert b"lf-before lf-after\n" in dump
    assert b"cr-before cr-after\n" in dump
    assert b"nul-before nul-after\n" in dump
    assert b"smuggle . MAIL FROM:<evil@ext.test>\n" in dump
    assert b"\n.leading dot\n" in dump  # stuffed again towards the next hop, which unstuffs
    assert b"\r" not in dump and b"\x00" not in dump
    assert dump.count(b"Subject: " + marker.encode()) == 1


def test_clean_content_and_dot_stuffing() -> None:
    assert clean_content(b"a\nb\rc\x00d\r\n") == b"a b c d\r\n"
    assert clean_content(b"a\r\r\nb") == b"a \r\nb\r\n"
    assert clean_content(b"") == b""
    assert dot_stuff(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n.\r\n"


def test_received_header_is_safe() -> None:
    handler = relay("127.0.0.1:1", hostname="mx(1).farm.test")
    session = SimpleNamespace(
        peer=("127.0.0.1", 5),
        proxy_data=None,
        host_name="evil\r\nX-Injected: yes (x);",
        extended_smtp=True,
        ssl=None,
        authenticated=False,
        id="s1",
    )
    envelope = SimpleNamespace(rcpt_tos=["r@farm.test", "s@farm.test"])
    header = handler.received_header(SimpleNamespace(hostname="ignored"), session, envelope)
    assert header.endswith(b"\r\n") and header.count(b"\r\n") == 3
    assert all(line.startswith(b"\t") for line in header.split(b"\r\n")[1:-1])
    assert b"\nX-Injected" not in header
    assert b"for <" not in header  # recipients are not disclosed for several
    parsed = BytesHeaderParser(policy=email.policy.strict).parsebytes(header + b"\r\n")
    assert parsed["Received"].startswith("from evil__X-Injected:_yes__x__ ([127.0.0.1])")
    assert "by mx_1_.farm.test (farm) with ESMTP id s1;" in str(parsed["Received"])


def test_smtputf8_address(make_controller: Any, sink: Any) -> None:
    next_hop = sink()
    with smtplib.SMTP("127.0.0.1", next_hop.port, timeout=WAIT) as probe:
        probe.ehlo("probe.test")
        sink_has_utf8 = probe.has_extn("smtputf8")
    controller = make_controller(relay(next_hop.next_hop))
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        assert client.mail("a@ext.test", ["SMTPUTF8"])[0] == 250
        assert client.rcpt(f"jürgen@{DOMAIN}")[0] == 250
        code, text = client.data(message("utf8"))
    if sink_has_utf8:
        assert code == 250, text
        assert "X-Rcpt-Args: <jürgen@farm.test>".encode() in next_hop.wait_for(b"Subject: utf8")
    else:
        assert (code, text[:5]) == (553, b"5.6.7")
