"""farm.maildir.Maildir: durable delivery, 451 on I/O errors, a loop that never blocks.

Real sockets (a Controller per test, smtplib clients) and real file systems: a tiny tmpfs for
ENOSPC, a frozen ext4 loop device for a write that hangs. Both need root (mount); without it
those tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import mailbox
import os
import signal
import smtplib
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.maildir import DELIVERY_FAILED, Maildir, mailbox_dir_name
from tests.conftest import new_loop
from tests.support.client import SMTPClient
from tests.support.farms import SMTP_SOURCE, FarmRunner, run_smtp_source, toml_config
from tests.support.loops import both_loops  # noqa: F401  (loop_kind: asyncio and uvloop)
from tests.support.wait import WAIT, wait_for

SENDER = "sender@client.test"
MESSAGE = (
    b"From: Anne <anne@example.com>\r\n"
    b"To: Bart <bart@example.com>\r\n"
    b"Subject: durable\r\n"
    b"\r\n"
    b"Hi Bart,\r\n"
    b".a line that starts with a dot\r\n"
    b"8-bit: \xc3\xa9\xff\r\n"
    b"no final newline is added by us\r\n"
)


def send(port: int, rcpts: list[str], message: bytes = MESSAGE) -> tuple[int, str]:
    """One transaction; the reply to DATA as (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(message)
        return code, text.decode()


def entries(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.is_dir() else []


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def mount_or_skip(*command: str) -> None:
    result = run(*command)
    if result.returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(command)}): {result.stderr.strip()}")


def unmount(path: Path) -> None:
    if run("umount", str(path)).returncode != 0:
        run("umount", "-l", str(path))


# -- delivery -----------------------------------------------------------------------------------


def test_message_lands_in_new_with_the_exact_bytes(make_controller: Any, tmp_path: Path) -> None:
    path = tmp_path / "mail" / "inbox"  # neither exists yet
    controller = make_controller(Maildir(str(path)))
    code, text = send(controller.port, ["bart@example.com"])
    assert code == 250
    assert text.startswith("2.0.0 Ok: queued as ")
    name = text.rpartition(" ")[2]

    box = mailbox.Maildir(path, create=False)
    assert box.keys() == [name]
    assert box.get_bytes(name) == MESSAGE
    assert (path / "new" / name).read_bytes() == MESSAGE
    assert entries(path / "tmp") == []
    assert entries(path / "cur") == []
    for directory in (path, path / "tmp", path / "new", path / "cur"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((path / "new" / name).stat().st_mode) == 0o600

    # Unique names: a second message is a second file, not a replacement.
    assert send(controller.port, ["bart@example.com"])[0] == 250
    assert len(entries(path / "new")) == 2


def test_fsync_off_still_delivers(make_controller: Any, tmp_path: Path) -> None:
    controller = make_controller(Maildir(tmp_path / "box", fsync=False))
    assert send(controller.port, ["a@example.com"])[0] == 250
    assert [m.as_bytes() for m in mailbox.Maildir(tmp_path / "box", create=False)]


def test_per_recipient_gives_one_maildir_per_recipient(
    make_controller: Any, tmp_path: Path
) -> None:
    controller = make_controller(Maildir(str(tmp_path), per_recipient=True))
    rcpts = ["alice@example.com", "bob@example.org", "Carol.X-1@example.net", "alice@example.com"]
    code, _ = send(controller.port, rcpts)
    assert code == 250
    assert entries(tmp_path) == ["Carol.X-1", "alice", "bob"]
    for name in ("alice", "bob", "Carol.X-1"):
        box = mailbox.Maildir(tmp_path / name, create=False)
        assert [box.get_bytes(key) for key in box.iterkeys()] == [MESSAGE]  # one copy each
        assert entries(tmp_path / name / "tmp") == []


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("alice@example.com", "alice"),
        ("a.b-c_d@example.com", "a.b-c_d"),
        ("../../etc@example.com", "_.._.._etc"),
        ("..@example.com", "_.."),
        ("@example.com", "_"),
        ("a b/c@example.com", "a_b_c"),
        ("jos\u00e9@example.com", "jos_"),
        ('"x@y"@example.com', "_x_y_"),
        ("postmaster", "postmaster"),
    ],
)
def test_recipient_directory_names_are_sanitised(address: str, name: str) -> None:
    assert mailbox_dir_name(address) == name
    assert os.sep not in name and name not in ("", ".", "..")


# -- errors -------------------------------------------------------------------------------------


def _new_is_a_file(root: Path) -> Path:
    path = root / "inbox"
    for sub in ("tmp", "cur"):
        (path / sub).mkdir(parents=True)
    (path / "new").write_bytes(b"not a directory")  # root ignores modes: break the path instead
    return path


def _under_proc(root: Path) -> Path:
    return Path("/proc/farm-maildir-test/inbox")


@pytest.mark.parametrize("broken", [_new_is_a_file, _under_proc], ids=["new-is-a-file", "proc"])
def test_unwritable_maildir_gives_451_and_no_file(
    make_controller: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    broken: Callable[[Path], Path],
) -> None:
    path = broken(tmp_path)
    controller = make_controller(Maildir(str(path)))
    with caplog.at_level(logging.WARNING, logger="farm.maildir"):
        code, text = send(controller.port, ["bart@example.com"])
    assert f"{code} {text}" == DELIVERY_FAILED
    assert entries(path / "tmp") == []
    if (path / "new").is_file():
        assert (path / "new").read_bytes() == b"not a directory"
    records = [r for r in caplog.records if r.name == "farm.maildir"]
    assert len(records) == 1
    assert records[0].exc_info is None
    assert "delivery failed" in records[0].getMessage()


def test_per_recipient_failure_leaves_no_copy_anywhere(
    make_controller: Any, tmp_path: Path
) -> None:
    (tmp_path / "bob").write_bytes(b"a file where bob's Maildir should be")
    controller = make_controller(Maildir(str(tmp_path), per_recipient=True))
    code, text = send(controller.port, ["alice@example.com", "bob@example.com"])
    assert f"{code} {text}" == DELIVERY_FAILED
    assert entries(tmp_path / "alice" / "tmp") == []
    assert entries(tmp_path / "alice" / "new") == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root), unmounted at teardown."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mount_or_skip("mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mountpoint))
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def test_disk_full_gives_451_then_recovers(make_controller: Any, tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "inbox"
    controller = make_controller(Maildir(str(path)))
    filler = tiny_tmpfs / "filler"
    filler.write_bytes(b"x" * 48 * 1024)  # 16 KiB left
    big = b"Subject: big\r\n\r\n" + (b"0123456789abcdef" * 4 + b"\r\n") * 500  # 33 KB

    code, text = send(controller.port, ["bart@example.com"], big)
    assert f"{code} {text}" == DELIVERY_FAILED
    assert entries(path / "tmp") == []
    assert entries(path / "new") == []

    filler.unlink()
    code, text = send(controller.port, ["bart@example.com"], big)
    assert code == 250, text
    assert entries(path / "tmp") == []
    [name] = entries(path / "new")
    assert (path / "new" / name).read_bytes() == big


# -- the event loop is not blocked --------------------------------------------------------------


@pytest.fixture
def freezable_fs(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 on a loop device (needs root); thawed and unmounted at teardown."""
    image = tmp_path / "ext4.img"
    mountpoint = tmp_path / "ext4"
    mountpoint.mkdir()
    with open(image, "wb") as file:
        file.truncate(16 * 1024 * 1024)
    made = run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    mount_or_skip("mount", "-o", "loop", str(image), str(mountpoint))
    try:
        yield mountpoint
    finally:
        run("fsfreeze", "-u", str(mountpoint))  # harmless if not frozen
        unmount(mountpoint)


def blocked_threads() -> list[str]:
    """Threads of this process in uninterruptible sleep (state D)."""
    found = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rpartition(")")[2].split()
            if fields[0] == "D":
                found.append(tid)
    return found


def test_a_hanging_write_does_not_block_other_sessions(
    make_controller: Any, freezable_fs: Path
) -> None:
    path = freezable_fs / "inbox"
    controller = make_controller(Maildir(str(path)))
    frozen = run("fsfreeze", "-f", str(freezable_fs))
    if frozen.returncode != 0:
        pytest.skip(f"cannot freeze the file system: {frozen.stderr.strip()}")

    replies: list[tuple[int, str]] = []
    sender = threading.Thread(
        target=lambda: replies.append(send(controller.port, ["bart@example.com"])), daemon=True
    )
    sender.start()
    try:
        # The handler's executor thread is now stuck in the kernel on the frozen file system.
        wait_for(
            blocked_threads, timeout=WAIT, what="the delivery blocked on the frozen file system"
        )
        other = SMTPClient(controller.port, timeout=10)
        try:
            assert other.reply().startswith("220 ")
            assert other.command("EHLO other.test").startswith("250")
            assert other.command("NOOP").startswith("250")
            assert other.command("QUIT").startswith("221")
        finally:
            other.close()
        assert sender.is_alive() and not replies  # still no reply for the frozen delivery
    finally:
        run("fsfreeze", "-u", str(freezable_fs))
    sender.join(WAIT)
    assert not sender.is_alive()
    [(code, _)] = replies
    assert code == 250
    assert [mailbox.Maildir(path, create=False).get_bytes(k) for k in os.listdir(path / "new")] == [
        MESSAGE
    ]


# -- a real farm --------------------------------------------------------------------------------


def maildir_config(tmp_path: Path, path: Path) -> Path:
    return toml_config(
        tmp_path / "farm.toml",
        {"handler": "farm.maildir:Maildir", "graceful_timeout": 20},
        handler_args={"path": str(path)},
    )


class Sender(threading.Thread):
    """Sends numbered messages until stopped; records the numbers that got 250."""

    def __init__(self, port: int, index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.index = index
        self.stop = stop
        self.accepted: list[str] = []
        self.failures = 0

    def run(self) -> None:
        number = 0
        while not self.stop.is_set() and self.failures < 200:
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=WAIT) as client:
                    while not self.stop.is_set():
                        number += 1
                        token = f"token-{self.index}-{number}"
                        body = f"Subject: {token}\r\n\r\n{token}\r\n" + "x" * 200 + "\r\n"
                        client.sendmail(SENDER, ["r@farm.test"], body)  # raises unless 250
                        self.accepted.append(token)
            except (OSError, smtplib.SMTPException):
                self.failures += 1


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SMTP_SOURCE), reason="needs Postfix's smtp-source")
def test_farm_delivers_everything_it_accepted(farms: FarmRunner, tmp_path: Path) -> None:
    path = tmp_path / "maildir"
    farm = farms.start(config=maildir_config(tmp_path, path), workers=2)
    slots = farm.wait_ready(2)

    result = run_smtp_source(farm.port, "-s", "5", "-m", "50", "-l", "512")
    assert result.returncode == 0, result.stderr
    assert len(entries(path / "new")) == 50
    assert entries(path / "tmp") == []
    for name in entries(path / "new"):
        assert (path / "new" / name).stat().st_size >= 512

    # kill -9 a worker under load: every message that got 250 is in new/.
    stop = threading.Event()
    senders = [Sender(farm.port, i, stop) for i in range(4)]
    for sender in senders:
        sender.start()
    try:
        wait_for(lambda: sum(len(s.accepted) for s in senders) >= 100, what="100 accepted")
        os.kill(slots[min(slots)], signal.SIGKILL)
        at_kill = sum(len(s.accepted) for s in senders)
        wait_for(
            lambda: sum(len(s.accepted) for s in senders) >= at_kill + 100,
            what="100 more accepted after the kill",
        )
    finally:
        stop.set()
        for sender in senders:
            sender.join(WAIT)
    assert not any(sender.is_alive() for sender in senders)

    accepted = {token for sender in senders for token in sender.accepted}
    stored = set()
    for name in entries(path / "new"):
        text = (path / "new" / name).read_bytes().decode()
        if text.startswith("Subject: token-"):
            token = text.split("\r\n", 1)[0].removeprefix("Subject: ")
            assert text.endswith("x" * 200 + "\r\n"), f"partial file {name}"
            stored.add(token)
    assert accepted - stored == set()


# -- stale tmp/ files ---------------------------------------------------------------------------

HOUR = 3600.0
STALE = 36 * HOUR


class Envelope:
    """The parts of an envelope Maildir reads."""

    def __init__(self, rcpts: list[str], content: bytes = MESSAGE) -> None:
        self.original_content = content
        self.content = content
        self.rcpt_tos = rcpts


class Session:
    id = "test.1"


def make_maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def aged(path: Path, seconds: float, data: bytes = b"partial") -> Path:
    """``path`` (a new file holding ``data`` unless it exists) last touched ``seconds`` ago."""
    if not os.path.lexists(path):
        path.write_bytes(data)
    then = path.lstat().st_mtime - seconds
    os.utime(path, (then, then), follow_symlinks=False)
    return path


def deliver(handler: Maildir, rcpts: list[str], loop_kind: str) -> str:
    """One delivery through ``handle_DATA`` on a fresh loop, any sweep it started awaited."""

    async def main() -> str:
        reply = await handler.handle_DATA(None, Session(), Envelope(rcpts))
        if handler._cleanup_task is not None:
            await handler._cleanup_task
        return reply

    loop = new_loop(loop_kind)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_only_stale_regular_files_in_tmp_are_removed(tmp_path: Path) -> None:
    box = make_maildir(tmp_path / "inbox")
    old = aged(box / "tmp" / "1.M1P1Q1.host", STALE + HOUR)
    older = aged(box / "tmp" / "2.M2P2Q2.host", 30 * 24 * HOUR)
    partial = aged(box / "tmp" / "3.M3P3Q3.host", 0)  # being written right now
    young = aged(box / "tmp" / "4.M4P4Q4.host", STALE - HOUR)
    read_lately = aged(box / "tmp" / "5.M5P5Q5.host", STALE + HOUR)
    os.utime(read_lately, (read_lately.stat().st_mtime + 2 * HOUR, read_lately.stat().st_mtime))
    old_dir = box / "tmp" / "subdir"
    old_dir.mkdir()
    aged(old_dir, STALE + HOUR)
    old_new = aged(box / "new" / "6.M6P6Q6.host", STALE + HOUR)  # delivered: not tmp's business
    old_cur = aged(box / "cur" / "7.M7P7Q7.host:2,S", STALE + HOUR)

    assert Maildir(box).remove_stale_tmp() == (2, [])
    assert not old.exists() and not older.exists()
    for kept in (partial, young, read_lately, old_dir, old_new, old_cur):
        assert kept.exists(), kept
    assert partial.read_bytes() == b"partial"
    assert Maildir(box).remove_stale_tmp() == (0, [])


def test_a_symlink_in_tmp_is_neither_followed_nor_removed(tmp_path: Path) -> None:
    box = make_maildir(tmp_path / "inbox")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = aged(elsewhere / "precious", STALE * 10, b"precious")
    target_dir = elsewhere / "dir"
    target_dir.mkdir()
    inside = aged(target_dir / "old", STALE * 10, b"inside")
    link = box / "tmp" / "link"
    link.symlink_to(target)
    aged(link, STALE * 10)  # the link itself is old too
    dir_link = box / "tmp" / "dir-link"
    dir_link.symlink_to(target_dir, target_is_directory=True)
    dangling = box / "tmp" / "dangling"
    dangling.symlink_to(tmp_path / "nothing")

    assert Maildir(box).remove_stale_tmp() == (0, [])
    assert link.is_symlink() and dir_link.is_symlink() and dangling.is_symlink()
    assert target.read_bytes() == b"precious"
    assert inside.read_bytes() == b"inside"


def test_a_symlinked_tmp_directory_is_not_swept(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = aged(elsewhere / "old", STALE * 10)
    box = tmp_path / "inbox"
    for sub in ("new", "cur"):
        (box / sub).mkdir(parents=True)
    (box / "tmp").symlink_to(elsewhere, target_is_directory=True)

    removed, failures = Maildir(box).remove_stale_tmp()
    assert removed == 0
    assert failures == [f"{box / 'tmp'} is a symbolic link, not swept"]
    assert victim.exists()


def test_per_recipient_sweeps_every_mailbox_but_not_through_symlinks(tmp_path: Path) -> None:
    alice = aged(make_maildir(tmp_path / "alice") / "tmp" / "old", STALE + HOUR)
    bob = aged(make_maildir(tmp_path / "bob") / "tmp" / "old", STALE + HOUR)
    root = aged(make_maildir(tmp_path) / "tmp" / "old", STALE + HOUR)
    other = make_maildir(tmp_path.parent / f"{tmp_path.name}-other")
    foreign = aged(other / "tmp" / "old", STALE + HOUR)
    (tmp_path / "carol").symlink_to(other, target_is_directory=True)

    assert Maildir(tmp_path, per_recipient=True).remove_stale_tmp() == (3, [])
    assert not alice.exists() and not bob.exists() and not root.exists()
    assert foreign.exists()


def test_missing_maildir_is_not_an_error(tmp_path: Path) -> None:
    assert Maildir(tmp_path / "not-yet").remove_stale_tmp() == (0, [])
    assert Maildir(tmp_path / "not-yet", per_recipient=True).remove_stale_tmp() == (0, [])
    assert not (tmp_path / "not-yet").exists()


def test_stale_tmp_age_is_configurable(tmp_path: Path) -> None:
    box = make_maildir(tmp_path / "inbox")
    hour_old = aged(box / "tmp" / "hour-old", HOUR + 60)
    minute_old = aged(box / "tmp" / "minute-old", 60)
    assert Maildir(box, stale_tmp_age=HOUR).remove_stale_tmp() == (1, [])
    assert not hour_old.exists() and minute_old.exists()
    with pytest.raises(ValueError, match="stale_tmp_age"):
        Maildir(box, stale_tmp_age=-1)


def test_sweep_at_first_delivery_then_at_most_hourly(
    tmp_path: Path, loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    box = make_maildir(tmp_path / "inbox")
    first = aged(box / "tmp" / "first", STALE + HOUR)
    handler = Maildir(box)
    with caplog.at_level(logging.INFO, logger="farm.maildir"):
        assert deliver(handler, ["bart@example.com"], loop_kind).startswith("250 ")
    assert not first.exists()
    assert entries(box / "tmp") == []
    [name] = entries(box / "new")
    assert (box / "new" / name).read_bytes() == MESSAGE
    lines = [r.getMessage() for r in caplog.records if r.name == "farm.maildir"]
    assert lines == [f"maildir tmp cleanup path={box} removed=1"]
    sweep = handler._cleanup_task

    # Within the hour: no new sweep, however stale tmp/ has become.
    second = aged(box / "tmp" / "second", STALE + HOUR)
    assert deliver(handler, ["bart@example.com"], loop_kind).startswith("250 ")
    assert handler._cleanup_task is sweep
    assert second.exists()

    # The next sweep is due an hour after the first (monotonic clock); once it is, the next
    # delivery sweeps again.
    assert 3500 < handler._next_cleanup - time.monotonic() <= 3600
    handler._next_cleanup = time.monotonic() - 1
    assert deliver(handler, ["bart@example.com"], loop_kind).startswith("250 ")
    assert handler._cleanup_task is not sweep
    assert not second.exists()
    assert len(entries(box / "new")) == 3


def test_stale_tmp_age_zero_never_sweeps(tmp_path: Path, loop_kind: str) -> None:
    box = make_maildir(tmp_path / "inbox")
    old = aged(box / "tmp" / "old", STALE * 10)
    handler = Maildir(box, stale_tmp_age=0)
    assert deliver(handler, ["bart@example.com"], loop_kind).startswith("250 ")
    assert handler._cleanup_task is None
    assert old.exists()


def test_sweep_errors_are_warnings_and_delivery_goes_on(
    tmp_path: Path,
    loop_kind: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    box = make_maildir(tmp_path / "inbox")
    stuck = aged(box / "tmp" / "stuck", STALE + HOUR)
    gone = aged(box / "tmp" / "gone", STALE + HOUR)
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(path) == "stuck":
            raise PermissionError(1, "Operation not permitted")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    handler = Maildir(box)
    with caplog.at_level(logging.INFO, logger="farm.maildir"):
        assert deliver(handler, ["bart@example.com"], loop_kind).startswith("250 ")
    assert stuck.exists() and not gone.exists()
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "farm.maildir"]
    assert records == [
        (logging.INFO, f"maildir tmp cleanup path={box} removed=1"),
        (
            logging.WARNING,
            f"maildir tmp cleanup path={box}: {box / 'tmp' / 'stuck'}: "
            "PermissionError: [Errno 1] Operation not permitted",
        ),
    ]

    # A sweep that fails outright is one warning; the delivery does not notice.
    def broken(now: float | None = None) -> tuple[int, list[str]]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(handler, "remove_stale_tmp", broken)
    handler._next_cleanup = 0.0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="farm.maildir"):
        assert deliver(handler, ["bart@example.com"], loop_kind).startswith("250 ")
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "farm.maildir"]
    assert records == [
        (
            logging.WARNING,
            f"maildir tmp cleanup failed path={box}: PermissionError: [Errno 13] Permission denied",
        )
    ]
    assert all(r.exc_info is None for r in caplog.records)
    assert len(entries(box / "new")) == 2


def test_delivery_over_smtp_sweeps_tmp(make_controller: Any, tmp_path: Path) -> None:
    alice = aged(make_maildir(tmp_path / "alice") / "tmp" / "old", STALE + HOUR)
    partial = aged(tmp_path / "alice" / "tmp" / "partial", 0)
    controller = make_controller(Maildir(tmp_path, per_recipient=True))
    code, _ = send(controller.port, ["alice@example.com", "bob@example.com"])
    assert code == 250
    wait_for(lambda: not alice.exists(), timeout=WAIT, what="the stale tmp/ file removed")
    assert partial.exists()
    for name in ("alice", "bob"):
        box = mailbox.Maildir(tmp_path / name, create=False)
        assert [box.get_bytes(key) for key in box.iterkeys()] == [MESSAGE]
