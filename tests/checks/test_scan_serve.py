"""Scanning end to end: smtplib -> ``farm serve`` with ``[scan]`` -> real rspamd -> Maildir.

Every verdict reaches the SMTP client as the reply to DATA (or BDAT LAST) and only a 250 puts
a file in the Maildir, with rspamd's headers in it; a stopped rspamd gives 451 or 250 as
``on_error`` says; the metrics count each scanner's verdicts.
"""

from __future__ import annotations

import mailbox
import smtplib
from pathlib import Path

import psutil
import pytest

from tests.support.client import SMTPClient
from tests.support.farms import Farm, FarmRunner, toml_config
from tests.support.rspamd import GTUBE, Rspamd, needs_rspamd
from tests.support.wait import WAIT, wait_for

pytestmark = needs_rspamd

SENDER = "sender@example.com"


def start_farm(
    farms: FarmRunner, tmp_path: Path, box: Path, workers: int = 1, **scan: object
) -> Farm:
    config = toml_config(
        tmp_path / f"farm-{len(farms.farms)}.toml",
        {"handler": "farm.maildir:Maildir", "graceful_timeout": 20},
        handler_args={"path": str(box), "fsync": False},
        scan=scan,
    )
    return farms.start(config=config, workers=workers)


def text(subject: str, body: str = "hello") -> str:
    return (
        f"From: <{SENDER}>\r\nTo: <rcpt@example.org>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{abs(hash(subject))}@example.com>\r\n\r\n{body}\r\n"
    )


def send(port: int, data: str | bytes) -> tuple[int, str]:
    """One message; the reply to the end of data as (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.ehlo("client.example.net")
        client.mail(SENDER)
        client.rcpt("rcpt@example.org")
        code, reply = client.data(data)
        return code, reply.decode()


def messages(box: Path) -> list[bytes]:
    if not (box / "new").exists():
        return []
    maildir = mailbox.Maildir(box, create=False)
    return [maildir.get_bytes(key) for key in maildir.iterkeys()]


@pytest.mark.parametrize("path", ["http", "milter"])
def test_gtube_is_refused_and_not_delivered(
    path: str, farms: FarmRunner, tmp_path: Path, rspamd: Rspamd
) -> None:
    box = tmp_path / "box"
    scan = {"rspamd": rspamd.url} if path == "http" else {"milters": [rspamd.milter]}
    farm = start_farm(farms, tmp_path, box, **scan)
    code, reply = send(farm.port, text("gtube", GTUBE.decode()))
    if path == "http":
        assert (code, reply) == (550, "5.7.1 Gtube pattern")
    else:
        assert (code, reply) == (554, "5.7.1 Gtube pattern")  # rspamd's proxy says 554
    assert messages(box) == []
    scanner = "rspamd" if path == "http" else rspamd.milter
    farm.wait_metric("farm_scan_results_total", 1, scanner=scanner, action="reject", worker="0")


def test_clean_message_arrives_with_rspamds_headers(
    farms: FarmRunner, tmp_path: Path, rspamd: Rspamd
) -> None:
    """Both paths in one farm: rspamd over HTTP first, then its milter proxy."""
    box = tmp_path / "box"
    farm = start_farm(farms, tmp_path, box, rspamd=rspamd.url, milters=[rspamd.milter])
    assert send(farm.port, text("clean"))[0] == 250
    (delivered,) = wait_for(lambda: messages(box), what="the message in the Maildir")
    head = delivered.split(b"\n\n", 1)[0].decode()
    assert head.count("X-Spam-Status: No, score=0.00") == 1  # the second scan replaced it
    assert "X-Spamd-Result: default: False [0.00 / 15.00]" in head
    assert "Subject: clean" in head and delivered.rstrip().endswith(b"hello")
    farm.wait_metric("farm_scan_results_total", 1, scanner="rspamd", action="accept", worker="0")
    farm.wait_metric(
        "farm_scan_results_total", 1, scanner=rspamd.milter, action="accept", worker="0"
    )
    assert farm.metric("farm_scan_duration_seconds_count", scanner="rspamd", worker="0") == 1
    # The verdicts are in the message's log line.
    line = farm.wait_log(r"[^\n]* msg=[^\n]*")[0]  # (a worker writes its lines within 100 ms)
    assert "outcome=250" in line and f"scan=rspamd:accept,{rspamd.milter}:accept" in line


def test_soft_reject_gives_451(farms: FarmRunner, tmp_path: Path, rspamd: Rspamd) -> None:
    box = tmp_path / "box"
    farm = start_farm(farms, tmp_path, box, rspamd=rspamd.url)
    assert send(farm.port, text("FARM-SOFT-REJECT")) == (451, "4.7.1 Try again later (farm test)")
    assert messages(box) == []


def test_bdat_last_is_scanned(farms: FarmRunner, tmp_path: Path, rspamd: Rspamd) -> None:
    box = tmp_path / "box"
    farm = start_farm(farms, tmp_path, box, milters=[rspamd.milter])
    data = text("bdat", GTUBE.decode()).encode()
    client = SMTPClient(farm.port)
    try:
        assert client.reply().startswith("220")
        assert "CHUNKING" in client.command("EHLO client.example.net")
        assert client.command(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert client.command("RCPT TO:<rcpt@example.org>").startswith("250")
        client.send(f"BDAT {len(data)} LAST\r\n".encode() + data)
        assert client.reply() == "554 5.7.1 Gtube pattern\r\n"
    finally:
        client.close()
    assert messages(box) == []


def test_stopped_rspamd_follows_on_error(
    farms: FarmRunner, tmp_path: Path, own_rspamd: Rspamd
) -> None:
    tempfail_box, accept_box = tmp_path / "tempfail", tmp_path / "accept"
    tempfail = start_farm(farms, tmp_path, tempfail_box, rspamd=own_rspamd.url)
    accept = start_farm(farms, tmp_path, accept_box, rspamd=own_rspamd.url, on_error="accept")
    for farm in (tempfail, accept):
        assert send(farm.port, text("before"))[0] == 250
    own_rspamd.stop()
    assert send(tempfail.port, text("after")) == (
        451,
        "4.7.1 Content scanning failed, try again later",
    )
    assert send(accept.port, text("after"))[0] == 250
    wait_for(lambda: len(messages(accept_box)) == 2, what="both messages delivered")
    assert len(messages(tempfail_box)) == 1
    unscanned = [m for m in messages(accept_box) if b"Subject: after" in m]
    assert unscanned and b"X-Spam-Status" not in unscanned[0]
    for farm in (tempfail, accept):
        farm.wait_metric("farm_scan_results_total", 1, scanner="rspamd", action="error", worker="0")
        farm.wait_log(r"scan: rspamd failed \(rspamd at http://127\.0\.0\.1:")
        assert "Traceback" not in farm.log()


def test_larger_than_max_size_is_not_scanned(
    farms: FarmRunner, tmp_path: Path, rspamd: Rspamd
) -> None:
    box = tmp_path / "box"
    farm = start_farm(farms, tmp_path, box, rspamd=rspamd.url, max_size=2000)
    assert (
        send(farm.port, text("big gtube", GTUBE.decode() + "\r\n" + ("y" * 70 + "\r\n") * 40))[0]
        == 250
    )
    (delivered,) = wait_for(lambda: messages(box), what="the message in the Maildir")
    assert delivered.startswith(b"X-Farm-Scan: not scanned; size ")
    farm.wait_metric("farm_scan_results_total", 1, scanner="rspamd", action="skipped", worker="0")


def test_ten_megabyte_message_is_scanned(farms: FarmRunner, tmp_path: Path, rspamd: Rspamd) -> None:
    """Scanned by both paths; the worker's RSS after five such messages stays bounded.

    The engine holds a message in memory until body spooling lands; scanning adds one copy
    when headers change, freed after delivery: RSS must not grow with every message.
    """
    box = tmp_path / "box"
    farm = start_farm(farms, tmp_path, box, rspamd=rspamd.url, milters=[rspamd.milter])
    (pid,) = farm.wait_workers(1).values()
    worker = psutil.Process(pid)
    body = ("z" * 998 + "\r\n") * (10 * 1024 * 1024 // 1000)
    assert send(farm.port, text("ten megabytes 1", body))[0] == 250
    first = worker.memory_info().rss
    for n in range(2, 6):
        assert send(farm.port, text(f"ten megabytes {n}", body))[0] == 250
    growth = worker.memory_info().rss - first
    assert growth < 10 * 1024 * 1024, f"RSS grew by {growth} bytes over four 10 MB messages"
    delivered = wait_for(lambda: len(messages(box)) == 5 and messages(box), what="5 messages")
    assert all(b"X-Spam-Status: No" in m and len(m) > 10_000_000 for m in delivered)
