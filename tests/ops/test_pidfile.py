"""The pidfile (issue 12, item 8): written as root without following links or truncating
someone else's file, and removed on every way out. Real ``farm serve`` processes."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest

from farm.pidfile import write_pidfile
from farm.supervisor.privileges import drop_privileges, resolve_user
from tests.support.farms import serve_expecting_exit
from tests.support.wait import wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (file owners, privileges)")


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    link = tmp_path / "farm.pid"
    link.symlink_to(target)
    proc = serve_expecting_exit("--pidfile", str(link), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"farm: pidfile {link}: is a symbolic link (refused)\n" in proc.stderr
    assert target.read_text() == "keep me\n"
    assert link.is_symlink()


def test_a_hard_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    link = tmp_path / "farm.pid"
    os.link(target, link)
    proc = serve_expecting_exit("--pidfile", str(link), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"farm: pidfile {link}: has 2 hard links (refused)\n" in proc.stderr
    assert target.read_text() == "keep me\n"


@needs_root
def test_a_file_of_another_user_is_never_truncated(tmp_path: Path) -> None:
    path = tmp_path / "farm.pid"
    path.write_text("someone else's\n")
    uid, gid = resolve_user("nobody")
    os.chown(path, uid, gid)
    proc = serve_expecting_exit("--pidfile", str(path), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"farm: pidfile {path}: owned by uid {uid}, not by us: refusing" in proc.stderr
    assert path.read_text() == "someone else's\n"


def test_written_then_removed_on_a_graceful_stop(farms: Any, tmp_path: Path) -> None:
    path = tmp_path / "farm.pid"
    path.write_text("12345\n")  # a stale one of ours: overwritten
    farm = farms.start("--handler", "farm.handlers:Sink", "--pidfile", str(path), workers=1)
    farm.wait_ready(1)
    assert path.read_text() == f"{farm.pid}\n"
    farm.signal(signal.SIGTERM)
    assert farm.wait_exit() == 0
    assert not path.exists()


def test_removed_when_the_start_fails_after_writing_it(tmp_path: Path) -> None:
    path = tmp_path / "farm.pid"
    # A handler that cannot be loaded: the worker fails at boot, after the pidfile was written.
    proc = serve_expecting_exit(
        "--pidfile", str(path), "--handler", "farm_no_such_module:Handler", cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    assert "farm_no_such_module" in proc.stderr
    assert "supervisor pid" in proc.stderr  # (printed once the pidfile is written)
    assert not path.exists()


def test_left_alone_when_another_instance_replaced_it(farms: Any, tmp_path: Path) -> None:
    path = tmp_path / "farm.pid"
    farm = farms.start("--handler", "farm.handlers:Sink", "--pidfile", str(path), workers=1)
    farm.wait_ready(1)
    path.unlink()
    path.write_text("999999\n")  # a newer instance's
    farm.signal(signal.SIGTERM)
    assert farm.wait_exit() == 0
    assert path.read_text() == "999999\n"


@needs_root
def test_emptied_when_the_user_cannot_remove_it() -> None:
    """Dropped to a user that cannot write the directory: the pid is at least erased."""
    directory = Path(tempfile.mkdtemp(prefix="farm-pid-"))
    directory.chmod(0o755)  # root's: nobody may not unlink in it
    path = directory / "farm.pid"
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                pidfile = write_pidfile(str(path))
                drop_privileges("nobody", None)
                os.write(write_end, path.read_bytes())
                pidfile.remove()
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            written = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert written == f"{pid}\n".encode()
        wait_for(path.exists, what="the pidfile")
        assert path.read_bytes() == b""
    finally:
        shutil.rmtree(directory)
