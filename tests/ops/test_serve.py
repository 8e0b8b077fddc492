"""`farm serve`: a real process, a real client, a real SIGTERM."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

from tests.support.client import SMTPClient
from tests.support.farms import FarmRunner, serve_expecting_exit, toml_config
from tests.support.net import free_port

SYNC_ERROR = "554 5.5.0 Error: SMTP protocol synchronization"


def test_serve_delivers_and_stops_on_sigterm(farms: FarmRunner) -> None:
    port = free_port()
    farm = farms.start(
        "--handler",
        "farm.handlers:Debugging",
        workers=1,
        bind=f"127.0.0.1:{port}",
        metrics=False,
        log_file=False,  # the banner and the log on stderr
    )
    assert farm.port == port  # the banner names the address
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.com", ["b@example.com"], "Subject: hi\r\n\r\nbody\r\n")
    farm.signal(signal.SIGTERM)
    assert farm.wait_exit(30) == 0
    out, err = farm.stdout_path.read_text(), farm.stderr()
    assert "Subject: hi" in out
    assert "outcome=250" in err
    assert "Traceback" not in err


def test_serve_refuses_undeclared_and_broken_utf8_addresses(farms: FarmRunner) -> None:
    """farm serve's default ``[smtp] strict_smtputf8 = true`` (security notes 6.1 item 10): an
    8-bit address needs SMTPUTF8 and valid UTF-8; a declared one is taken."""
    farm = farms.start("--handler", "farm.handlers:Sink", workers=1, metrics=False)
    with SMTPClient(farm.port, greeting=True) as client:
        assert client.command(b"EHLO client.example").code == 250
        undeclared = client.command("MAIL FROM:<jürgen@example.com>".encode())
        assert undeclared.text == "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
        broken = client.command(b"MAIL FROM:<\xff@example.com> SMTPUTF8")
        assert broken.text == "500 5.5.2 Error: bad UTF-8 syntax"
        declared = client.command("MAIL FROM:<jürgen@example.com> SMTPUTF8".encode())
        assert declared.text == "250 2.1.0 OK"
        assert client.command("RCPT TO:<ü@example.com>".encode()).text == "250 2.1.5 OK"
        assert client.command(b"QUIT").code == 221
    farm.signal(signal.SIGTERM)
    assert farm.wait_exit(30) == 0
    assert "Traceback" not in farm.stderr()


def test_serve_refuses_clients_that_do_not_wait(farms: FarmRunner, tmp_path: Path) -> None:
    """farm serve's default ``[smtp] forbid_unauth_pipelining = true`` (security notes 6.1
    item 5): a bot's whole dialogue in one write after the greeting gets 554 5.5.0 and nothing
    is delivered; one that talks before the greeting (``greeting_delay``) too; a client that
    pipelines as RFC 2920 allows is served. Each refusal is logged and counted by kind."""
    config = toml_config(
        tmp_path / "farm.toml", {"handler": "farm.handlers:Sink"}, smtp={"greeting_delay": 0.3}
    )
    farm = farms.start(config=config, workers=1)
    blast = b"EHLO bot.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhi\r\n.\r\n"
    with SMTPClient(farm.port, greeting=True) as client:
        client.send(blast)
        assert [r.text for r in client.replies_until_close()] == [SYNC_ERROR]
    with SMTPClient(farm.port) as client:
        client.send(blast)  # before the 220
        assert [r.text for r in client.replies_until_close()] == [SYNC_ERROR]
    with SMTPClient(farm.port, greeting=True) as client:
        assert "PIPELINING" in client.command(b"EHLO client.example")
        client.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        assert [client.reply().code for _ in range(3)] == [250, 250, 354]
        assert client.command(b"hi\r\n.").code == 250
        assert client.command(b"QUIT").code == 221
    assert farm.metric_total("farm_protocol_violations_total", kind="pipelining") == 1
    assert farm.metric_total("farm_protocol_violations_total", kind="early_talker") == 1
    farm.signal(signal.SIGTERM)
    assert farm.wait_exit(30) == 0
    log = farm.log()
    assert "sent on before the reply to EHLO: refused" in log
    assert "spoke before the greeting: refused" in log
    assert "Traceback" not in log + farm.stderr()


def test_serve_bad_handler_is_a_clear_error(tmp_path: Path) -> None:
    proc = serve_expecting_exit("-w", "2", "--handler", "no.such.module:Handler", cwd=tmp_path)
    assert proc.returncode == 1
    assert "cannot import handler module 'no.such.module'" in proc.stderr
    assert "before it was ready (the handler could not be loaded); stopping" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_handler_the_engine_refuses_is_a_clear_error(tmp_path: Path) -> None:
    """Checked as the worker boots, not at the first connection: a client would otherwise
    connect and wait for a greeting that never comes."""
    handler = "tests.support.handlers.refused:Handler"
    proc = serve_expecting_exit("--handler", handler, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"handler {handler} refused by the engine: RuntimeError: Unsupported EHLO Hook" in (
        proc.stderr
    )
    assert "before it was ready (the handler could not be loaded); stopping" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_bad_bind_is_a_clear_error(tmp_path: Path) -> None:
    proc = serve_expecting_exit("--bind", "nonsense", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "farm: command line: bind: bad address 'nonsense': "
        "expected HOST:PORT, [IPv6]:PORT, unix:/path or fd://N\n"
    )
