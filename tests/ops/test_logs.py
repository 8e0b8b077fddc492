"""The farm's log: one line per message and per session, safe against forging, batched but
never lost on a graceful stop, JSON on request, and SIGUSR1 that never takes the farm down.

Real ``farm serve`` processes, real SMTP sessions over loopback, real signals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from farm.logs import JSONFormatter, LogWriter, TextFormatter, configure_logging, reopen_log_file
from farm.smtp.logline import MessageLine, SessionLine, log_fields, log_info, quote
from farm.smtp.session import Session
from farm.supervisor.privileges import drop_privileges, resolve_user
from tests.support.client import SMTPClient, send_message
from tests.support.farms import run_smtp_source, serve_expecting_exit
from tests.support.fork import in_child
from tests.support.wait import wait_for

SINK = "farm.handlers:Sink"
#: A token of a log line: key=bare or key="quoted with \" escapes".
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def _fields(line: str) -> list[tuple[str, str]]:
    """The key=value fields after the logger name, in order (quoted values kept quoted)."""
    message = line.split(": ", 1)[1]
    return _FIELD.findall(message)


def _smtp_lines(log: str) -> list[str]:
    return [line for line in log.split("\n") if " farm.smtp: " in line]


# -- quoting --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        ("<a@example.com>", "<a@example.com>"),
        ("", '""'),
        ('<"x outcome=550"@example.com>', '"<\\"x outcome=550\\"@example.com>"'),
        ("a\r\nb", '"a\\x0d\\x0ab"'),
        ("a\u2028b\u2029c\x85d", '"a\\u2028b\\u2029c\\x85d"'),
        ("caf\u00e9", '"caf\u00e9"'),
        ("back\\slash", '"back\\\\slash"'),
        ("\udcff", '"\\udcff"'),  # an undecodable byte, surrogate-escaped
    ],
)
def test_quote_makes_one_token_of_any_value(value: str, logged: str) -> None:
    assert quote(value) == logged
    assert len(logged.splitlines()) == 1


def test_text_formatter_keeps_a_record_on_its_line() -> None:
    formatter = TextFormatter()
    record = logging.LogRecord("farm.x", logging.INFO, "f", 1, "a\nb\u2028c", None, None)
    line = formatter.format(record)
    assert line.splitlines() == [line]
    assert line.endswith(f"INFO [{os.getpid()}] farm.x: a\\x0ab\\u2028c")
    try:
        raise ValueError("bad\n2026-01-01 00:00:00,000 INFO [1] farm.smtp: forged")
    except ValueError:
        record = logging.LogRecord("farm.x", logging.ERROR, "f", 1, "boom", None, sys.exc_info())
    lines = formatter.format(record).split("\n")
    assert lines[0].endswith("farm.x: boom")
    assert all(part.startswith("    ") for part in lines[1:])  # a traceback never starts a record


def test_json_formatter_writes_the_fields() -> None:
    session = SimpleNamespace(id="1f.7", peer=("127.0.0.1", 5), proxy_data=None)
    message = MessageLine(session, 1, "a\u2028@x", 2, 25, "250", 0.25, " spf=pass dkim=none")
    record = logging.LogRecord("farm.smtp", logging.INFO, "f", 1, message, None, None)
    line = JSONFormatter().format(record)
    assert line.isascii() and len(line.splitlines()) == 1
    data = json.loads(line)
    assert data["event"] == "message"
    assert (data["from"], data["rcpts"], data["outcome"], data["duration"]) == (
        "<a\u2028@x>",
        2,
        "250",
        0.25,
    )
    assert "client" not in data
    assert {"time", "level", "pid", "logger", "session", "msg", "peer", "size"} <= set(data)
    assert (data["spf"], data["dkim"]) == ("pass", "none")  # the stages' results, by name
    assert str(message).endswith("outcome=250 duration=0.250s spf=pass dkim=none")


def only_handler(writer: logging.Handler) -> None:
    """Make ``writer`` the root logger's only handler, as ``configure_logging`` does (in a
    forked child: the test process keeps its own)."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.addHandler(writer)
    root.setLevel(logging.INFO)


def test_a_log_file_is_flushed_by_the_event_loop_in_batches(tmp_path: Path) -> None:
    """To a file, a worker's lines are written by a timer of its loop (no thread), a batch
    within FLUSH_INTERVAL of its first line; a line from another thread is scheduled onto the
    loop; stop_batching writes what is left."""
    path = tmp_path / "farm.log"

    def body() -> str:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        writer = LogWriter(fd)
        writer.setFormatter(TextFormatter())
        only_handler(writer)
        session = SimpleNamespace(id="1f.7", peer=("127.0.0.1", 5), proxy_data=None, host_name="h")
        loop = asyncio.new_event_loop()
        threads_before = threading.active_count()
        smtp, other_logger = logging.getLogger("farm.smtp"), logging.getLogger("farm.x")

        async def run() -> None:
            writer.emit_direct(smtp, SessionLine(session, 1, 0, 0, 0, "quit", 0.1, ""), 1.5)
            other = threading.Thread(
                target=writer.emit_direct, args=(other_logger, "from a thread", 1.5), daemon=True
            )
            other.start()
            other.join()
            assert path.read_bytes() == b""  # queued, not written yet
            assert threading.active_count() == threads_before  # and no flusher thread
            await wait_for_async(lambda: path.read_bytes().count(b"\n") == 2, timeout=10)
            writer.emit_direct(smtp, "the last one", 2.5)

        try:
            writer.start_batching(loop)
            loop.run_until_complete(run())
        finally:
            writer.stop_batching()
            loop.close()
            os.close(fd)
        return ""

    assert in_child(body) == (0, "")
    lines = path.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "session=1f.7 peer=127.0.0.1:5 helo=h commands=1 accepted=0 rejected=0 bytes=0 "
        "end=quit duration=0.100s",
        "from a thread",
        "the last one",
    ]


def test_a_batch_takes_the_route_logging_would_when_it_is_written(tmp_path: Path) -> None:
    """While the writer batches, ``log_info`` queues its lines without asking whether the
    writer alone would get them; the writer asks when it writes the batch. A line whose logger
    got a handler or a filter meanwhile goes through ``logging`` then: that handler gets it
    (with the time it was logged), a filter can drop it, and the writer writes it once."""
    path = tmp_path / "farm.log"

    def body() -> str:
        configure_logging("INFO", str(path))
        writer = next(h for h in logging.getLogger().handlers if isinstance(h, LogWriter))
        loop = asyncio.new_event_loop()
        writer.start_batching(loop)
        smtp, dropped = logging.getLogger("farm.smtp"), logging.getLogger("farm.dropped")
        seen: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record)

        session = Session(loop)
        session.peer, session.id = ("192.0.2.7", 2525), "ab.1"
        values = (session, 1, "a@x", 1, 5, "250", 0.001, "")
        try:
            log_info(smtp, "before the handler")  # queued: the route is checked when written
            log_fields(smtp, MessageLine, values)  # queued as its values, built when needed
            log_info(dropped, "filtered out")
            smtp.addHandler(Keep())
            dropped.addFilter(lambda record: False)
            writer.flush()  # the route now reaches Keep too, and farm.dropped filters
            log_info(smtp, "after the handler")
            writer.stop_batching()
        finally:
            loop.close()
        assert [(r.getMessage(), r.created < time.time()) for r in seen] == [
            ("before the handler", True),
            (MESSAGE, True),
            ("after the handler", True),
        ]
        assert isinstance(seen[1].msg, MessageLine) and seen[1].msg.values == values
        return ""

    assert in_child(body) == (0, "")
    lines = path.read_text().splitlines()
    assert [line.split(" farm.smtp: ", 1)[1] for line in lines] == [
        "before the handler",
        MESSAGE,
        "after the handler",
    ]


#: The text of the engine's line in the test above.
MESSAGE = (
    "session=ab.1 msg=ab.1.1 peer=192.0.2.7:2525 from=<a@x> rcpts=1 size=5 outcome=250 "
    "duration=0.001s"
)


async def wait_for_async(condition: Any, timeout: float) -> None:
    """Let the loop run until ``condition()`` holds (at most ``timeout`` seconds)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not written in time"
        await asyncio.sleep(0.01)


def test_batched_lines_stay_on_their_line_whatever_a_field_holds() -> None:
    """The writer formats a batch of direct lines itself (skipping the whole-line check for
    message and session lines): every field that could hold a control character is escaped."""
    proxy = SimpleNamespace(valid=True, src_addr="10.0.0.1\nx")
    session = SimpleNamespace(
        id="1f.7", peer=("127.0.0.1\r", 5), proxy_data=proxy, host_name="h\x00elo"
    )
    read_fd, write_fd = os.pipe()

    def body() -> str:
        writer = LogWriter(write_fd)
        writer.setFormatter(TextFormatter())
        only_handler(writer)
        smtp = logging.getLogger("farm.smtp")
        writer.start_batching()
        try:
            message = MessageLine(session, 1, "a\n@x", 2, 25, "2\n5", 0.25, " x=\u2028")
            writer.emit_direct(smtp, message, 1.5)
            ended = SessionLine(session, 3, 1, 0, 25, "qu it\r", 0.5, " y=\x85")
            writer.emit_direct(smtp, ended, 1.5)
        finally:
            writer.stop_batching()
        return ""

    assert in_child(body) == (0, "")
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        lines = pipe.read().decode().split("\n")
    assert lines[2:] == [""] and all(line.isprintable() for line in lines[:2])
    assert [line.split(": ", 1)[1] for line in lines[:2]] == [
        'session=1f.7 msg=1f.7.1 peer="(\'127.0.0.1\\\\r\', 5)" client="10.0.0.1\\x0ax" '
        'from="<a\\x0a@x>" rcpts=2 size=25 outcome="2\\x0a5" duration=0.250s x=\\u2028',
        'session=1f.7 peer="(\'127.0.0.1\\\\r\', 5)" client="10.0.0.1\\x0ax" helo="h\\x00elo" '
        'commands=3 accepted=1 rejected=0 bytes=25 end="qu it\\x0d" duration=0.500s y=\\x85',
    ]


def test_recent_client_values_are_logged_alike_and_remembered_within_bounds() -> None:
    """A line's peer, sender and HELO tokens come from caches of recent values after their
    first use: the same text as the first time (quoted when it must be), in bounded memory."""
    from farm.smtp import logline

    session = SimpleNamespace(
        id="2a.1", peer=("::1", 25), proxy_data=None, host_name='he"lo outcome=550'
    )
    lines = [
        str(line)
        for _ in range(2)
        for line in (
            MessageLine(session, 1, 'a"b c@x', 1, 5, "250", 0.001, ""),
            MessageLine(session, 2, None, 1, 5, "250", 0.001, ""),
            SessionLine(session, 4, 2, 0, 10, "quit", 0.002, ""),
        )
    ]
    assert lines[:3] == lines[3:]
    assert lines[0].split(" peer=")[1].split(" rcpts=")[0] == '[::1]:25 from="<a\\"b c@x>"'
    assert " from=<> " in lines[1]
    assert ' helo="he\\"lo outcome=550" ' in lines[2]
    for n in range(3 * logline._CACHE_SIZE):
        peer = (f"10.{n // 256 % 256}.{n % 256}.1", n)  # a new session each time
        session = SimpleNamespace(id="2a.1", peer=peer, proxy_data=None, host_name=f"h{n}")
        assert f" peer={session.peer[0]}:{n} from=<s{n}@x> " in str(
            MessageLine(session, 1, f"s{n}@x", 1, 5, "250", 0.001, "")
        )
        assert f" helo=h{n} " in str(SessionLine(session, 1, 1, 0, 5, "quit", 0.001, ""))
    caches = (logline._hosts, logline._senders, logline._helos)
    assert all(0 < len(cache) <= logline._CACHE_SIZE for cache in caches)
    long_helo = "h" * (logline._CACHE_LONGEST + 1)
    session.host_name = long_helo
    for _ in range(2):
        assert f" helo={long_helo} " in str(SessionLine(session, 1, 1, 0, 5, "quit", 0.001, ""))
    assert long_helo not in logline._helos


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0, "0.000"),
        (0.0021, "0.002"),
        (0.0026, "0.003"),
        (0.9994, "0.999"),
        (0.9996, "1.000"),
        (12.3456, "12.346"),
        (-0.5, "-0.500"),
    ],
)
def test_durations_are_shown_to_the_millisecond(seconds: float, shown: str) -> None:
    """Sub-second durations come from a table, the rest from ``.3f``: the same text."""
    session = SimpleNamespace(id="2a.1", peer=("192.0.2.1", 25), proxy_data=None, host_name="h")
    message = MessageLine(session, 1, "a@x", 1, 5, "250", seconds, "")
    assert str(message).endswith(f" duration={shown}s")
    assert f" duration={shown}s" in str(SessionLine(session, 1, 1, 0, 5, "quit", seconds, ""))


def test_log_info_follows_the_level_and_disabling_like_logger_info(tmp_path: Path) -> None:
    """``log_info`` takes the writer's direct route only when ``logger.info`` would log: the
    logger's level (set after lines were logged, its answers cached), ``disabled``, and
    ``logging.disable``."""
    path = tmp_path / "farm.log"

    def body() -> str:
        configure_logging("INFO", str(path))
        log = logging.getLogger("farm.smtp")
        log_info(log, "one")  # (the logger caches its answer for INFO)
        log.setLevel(logging.WARNING)
        log_info(log, "not at WARNING")
        log.setLevel(logging.NOTSET)
        log_info(log, "two")
        log.disabled = True
        log_info(log, "not while disabled")
        log.disabled = False
        logging.disable(logging.INFO)
        log_info(log, "not under logging.disable")
        logging.disable(logging.NOTSET)
        log_info(log, "three")
        return ""

    assert in_child(body) == (0, "")
    lines = path.read_text().splitlines()
    assert [line.split(" farm.smtp: ", 1)[1] for line in lines] == ["one", "two", "three"]


# -- a real farm ----------------------------------------------------------------------------------


def test_client_values_cannot_forge_fields_or_records(farms: Any) -> None:
    """The attack of issue 12: a quoted local part carrying ``outcome=550`` and a U+2028."""
    farm = farms.start("--handler", SINK, workers=1)
    farm.wait_ready(1)
    evil = '"x outcome=550\u20282026-01-01 00:00:00,000 INFO [1] farm.smtp: session=forged"'
    client = SMTPClient(farm.port)
    try:
        assert client.reply().startswith("220")
        assert client.command("EHLO evil outcome=550\u2028host").startswith("250")
        assert client.command(f"MAIL FROM:<{evil}@example.com> SMTPUTF8").startswith("250")
        assert client.command("RCPT TO:<b@example.com>").startswith("250")
        assert client.command("DATA").startswith("354")
        assert client.command("Subject: x\r\n\r\nhi\r\n.").startswith("250")
        client.command("QUIT")
    finally:
        client.close()
    match = farm.wait_log(r'farm\.smtp: session=(\S+) peer=\S+ helo="evil')
    session = match[1]
    log = farm.log()
    # splitlines() splits at U+2028 too: no record may start with the forged text.
    assert not [line for line in log.splitlines() if line.startswith("2026-01-01")]
    mine = [line for line in _smtp_lines(log) if f"session={session} " in line]
    assert len(mine) == 2, mine  # one line for the message, one for the session
    message, whole = mine
    fields = _fields(message)
    assert [key for key, _ in fields] == [
        "session",
        "msg",
        "peer",
        "from",
        "rcpts",
        "size",
        "outcome",
        "duration",
    ]
    assert dict(fields)["outcome"] == "250"
    assert dict(fields)["from"].startswith('"<\\"x outcome=550\\u2028')
    assert dict(_fields(whole))["helo"] == '"evil outcome=550\\u2028host"'


def test_json_log_format(farms: Any, tmp_path: Path) -> None:
    farm = farms.start("--handler", SINK, "--log-format", "json", workers=1, metrics=False)
    farm.wait_ready(1)
    assert send_message(farm.port, "b@example.com").startswith("250")

    def events() -> list[dict[str, Any]]:
        return [json.loads(line) for line in farm.log().splitlines() if line.startswith("{")]

    found = wait_for(
        lambda: [e for e in events() if e.get("event") == "session" and e.get("accepted")],
        what="the session event",
    )
    records = events()
    lines = [line for line in farm.log().splitlines() if not line.startswith("{")]
    assert [line.split(" pid ")[0] for line in lines] == ["farm: supervisor"]  # (printed)
    [message] = [e for e in records if e.get("event") == "message"]
    assert (message["from"], message["rcpts"], message["outcome"]) == (
        "<sender@client.test>",
        1,
        "250",
    )
    assert message["session"] == found[0]["session"] == message["msg"].rsplit(".", 1)[0]
    assert found[0]["helo"] == "client.test" and found[0]["end"] == "quit"
    assert any(e.get("message", "").startswith("farm ready") for e in records)


def test_lines_are_flushed_without_more_traffic_and_none_lost_on_stop(farms: Any) -> None:
    farm = farms.start("--handler", SINK, workers=2)
    farm.wait_ready(2)
    assert send_message(farm.port, "b@example.com").startswith("250")
    # Written by the flusher within FLUSH_INTERVAL, not held until more lines come.
    farm.wait_log(r"farm\.smtp: session=\S+ msg=\S+ .* outcome=250")
    done = run_smtp_source(farm.port, "-s", "10", "-m", "300", "-c", timeout=120)
    assert done.returncode == 0, done.stderr
    farm.signal(signal.SIGTERM)  # at once: lines may still be buffered in the workers
    assert farm.wait_exit() == 0
    messages = [line for line in _smtp_lines(farm.log()) if " msg=" in line]
    assert len(messages) == 301


def test_usr1_survives_a_log_file_that_cannot_be_reopened(farms: Any, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    # The runner's own --log-file is off: this one lives in a directory that gets renamed.
    farm = farms.start(
        "--handler", SINK, "--log-file", str(logs / "farm.log"), log_file=False, wait=False
    )
    farm.log_path = logs / "farm.log"
    farms.wait_banner(farm)
    before = farm.wait_ready(2)
    moved = tmp_path / "moved"
    logs.rename(moved)  # the log directory is gone: reopening by name must fail
    farm.log_path = moved / "farm.log"  # where fd 2 still writes
    farm.signal(signal.SIGUSR1)
    failed = r"\[(\d+)\] farm\.logs: cannot reopen the log file, still writing to the old one"

    def everyone_said_so() -> bool:
        said = {int(pid) for pid in re.findall(failed, farm.log())}
        return said == {farm.pid, *before.values()}

    wait_for(everyone_said_so, what="the supervisor and both workers logging the failure")
    assert send_message(farm.port, "b@example.com").startswith("250")  # still serving
    farm.wait_log(r"farm\.smtp: session=\S+ msg=")
    assert farm.slots() == before  # no worker died
    # Once the directory is back, the next USR1 reopens it.
    moved.rename(logs)
    farm.log_path = logs / "farm.log"
    farm.signal(signal.SIGUSR1)
    farm.wait_log(r"farm\.supervisor: log file reopened")
    farm.signal(signal.SIGTERM)
    assert farm.wait_exit() == 0


def test_log_file_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    link = tmp_path / "farm.log"
    link.symlink_to(target)
    proc = serve_expecting_exit("--log-file", str(link), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == f"farm: log file {link}: is a symbolic link (refused)\n"
    assert target.read_text() == "keep me\n"


# -- privileges -----------------------------------------------------------------------------------


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")


@needs_root
def test_log_file_is_created_for_the_user_and_reopened_after_the_drop(tmp_path: Path) -> None:
    """With ``user =``, the file created before the drop is the user's: USR1 can reopen it."""
    logs = _world_dir()
    path = logs / "farm.log"
    uid, gid = resolve_user("nobody")

    def child() -> str:
        configure_logging("INFO", str(path), owner=(uid, gid))  # as root, like farm serve
        drop_privileges("nobody", None)
        ok = reopen_log_file(str(path))  # what SIGUSR1 does, as the user
        logging.getLogger("farm.test").info("after the reopen")
        logging.shutdown()
        return f"{ok}"

    try:
        code, message = in_child(child)
        assert (code, message) == (0, "True")
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, gid, 0o640)
        assert "farm.test: after the reopen" in path.read_text()
    finally:
        shutil.rmtree(logs)


def _world_dir() -> Path:
    """A directory ``nobody`` can enter and write (pytest's tmp dirs are 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="farm-logs-"))
    directory.chmod(0o777)
    return directory
