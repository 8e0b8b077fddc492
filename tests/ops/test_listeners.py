"""Listeners (bind, fd://, systemd LISTEN_FDS) and privilege dropping, with real sockets."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.supervisor.listeners import (
    AddressLike,
    Listener,
    ListenerError,
    accept_queue,
    bind_listeners,
    close_listeners,
    inherit_systemd_listeners,
)
from farm.supervisor.privileges import PrivilegeError, drop_privileges
from tests.support.fork import in_child
from tests.support.net import free_port, taken_port
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


@pytest.fixture
def bound() -> Iterator[list[Listener]]:
    """A list the test fills with listeners; all are closed afterwards."""
    listeners: list[Listener] = []
    yield listeners
    close_listeners(listeners)


def _bind(bound: list[Listener], *addresses: AddressLike | str, **options: Any) -> list[Listener]:
    listeners = bind_listeners(addresses, **options)
    bound.extend(listeners)
    return listeners


def _assert_serves(listener: Listener) -> None:
    """A client can connect and the listener accepts it."""
    sock = listener.socket
    if sock.family == socket.AF_UNIX:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = sock.getsockname()
        client.connect(name)
    else:
        client = socket.create_connection(sock.getsockname()[:2], timeout=5)
    with client:
        sock.settimeout(5)
        try:
            conn, _ = sock.accept()
        finally:
            sock.setblocking(False)
        with conn:
            conn.sendall(b"220 hi\r\n")
            assert client.recv(100) == b"220 hi\r\n"


def _assert_listener_flags(listener: Listener) -> None:
    sock = listener.socket
    assert sock.type == socket.SOCK_STREAM
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert sock.getblocking() is False
    assert sock.get_inheritable() is True


# --- TCP ---------------------------------------------------------------------------------------


def test_bind_tcp_ipv4(bound: list[Listener]) -> None:
    [listener] = _bind(bound, "127.0.0.1:0")
    assert listener.address == "127.0.0.1:0"
    assert listener.name == "127.0.0.1:0"
    port = listener.socket.getsockname()[1]
    assert port > 0
    assert listener.bound == f"127.0.0.1:{port}"
    assert not listener.from_systemd
    assert listener.socket.family == socket.AF_INET
    assert listener.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    _assert_listener_flags(listener)
    _assert_serves(listener)


@needs_ipv6
def test_bind_tcp_ipv6_is_v6only(bound: list[Listener]) -> None:
    [listener] = _bind(bound, "[::1]:0")
    assert listener.socket.family == socket.AF_INET6
    assert listener.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert listener.bound == f"[::1]:{listener.socket.getsockname()[1]}"
    _assert_listener_flags(listener)
    _assert_serves(listener)


@needs_ipv6
def test_ipv4_and_ipv6_on_the_same_port(bound: list[Listener]) -> None:
    port = free_port()
    v4, v6 = _bind(bound, f"127.0.0.1:{port}", f"[::1]:{port}")
    assert v4.socket.getsockname()[1] == v6.socket.getsockname()[1] == port
    _assert_serves(v4)
    _assert_serves(v6)


def test_bind_accepts_parsed_address_objects(bound: list[Listener]) -> None:
    from farm.addresses import parse_address

    [listener] = _bind(bound, parse_address("127.0.0.1:0"))
    assert listener.address == "127.0.0.1:0"


def test_bind_error_is_one_clear_line(bound: list[Listener]) -> None:
    with taken_port() as port, pytest.raises(ListenerError) as info:
        bind_listeners([f"127.0.0.1:{port}"])
    assert str(info.value) == f"cannot bind 127.0.0.1:{port}: [Errno 98] Address already in use"


def test_bad_address_text_is_a_listener_error() -> None:
    with pytest.raises(ListenerError, match="bad address 'nonsense'"):
        bind_listeners(["nonsense"])


def test_all_or_nothing(tmp_path: Path) -> None:
    """When one address fails, the ones bound before it are closed (and their files removed)."""
    path = tmp_path / "first.sock"
    with taken_port() as port, pytest.raises(ListenerError, match="Address already in use"):
        bind_listeners([f"unix:{path}", f"127.0.0.1:{port}"])
    assert not path.exists()


def test_permission_denied_for_a_low_port_when_unprivileged() -> None:
    """``cannot bind 127.0.0.1:25: [Errno 13] Permission denied`` as an ordinary user."""
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if not start.exists() or int(start.read_text()) <= 25:
        pytest.skip("ports below 1024 are not privileged on this host")
    if IS_ROOT:
        code, message = in_child(lambda: _bind_low_port_as("nobody"))
    else:
        code, message = 0, _bind_low_port_as(None)
    assert code == 0, message
    assert message == "cannot bind 127.0.0.1:25: [Errno 13] Permission denied"


def _bind_low_port_as(user: str | None) -> str:
    drop_privileges(user, None)
    try:
        close_listeners(bind_listeners(["127.0.0.1:25"]))
    except ListenerError as error:
        return str(error)
    return "bound port 25"


# --- Unix --------------------------------------------------------------------------------------


def test_bind_unix_with_mode(bound: list[Listener], tmp_path: Path) -> None:
    path = tmp_path / "farm.sock"
    [listener] = _bind(bound, f"unix:{path}", unix_mode=0o660)
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert listener.address == listener.name == f"unix:{path}"
    assert listener.bound == f"unix:{path}"
    _assert_listener_flags(listener)
    _assert_serves(listener)
    listener.close()
    assert not path.exists()


@needs_root
def test_bind_unix_with_owner(bound: list[Listener], tmp_path: Path) -> None:
    path = tmp_path / "owned.sock"
    _bind(bound, f"unix:{path}", unix_mode=0o600, unix_owner=(65534, 65534))
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (65534, 65534, 0o600)


def test_stale_unix_socket_is_replaced(bound: list[Listener], tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))  # closed without unlinking: a stale file, nobody listening
    assert path.exists()
    [listener] = _bind(bound, f"unix:{path}")
    _assert_serves(listener)


def test_live_unix_socket_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(ListenerError) as info:
            bind_listeners([f"unix:{path}"])
        assert str(info.value) == (
            f"cannot bind unix:{path}: another process is listening on {path}"
        )
        client = socket.socket(socket.AF_UNIX)
        with client:
            client.connect(str(path))  # still the old listener's file


def test_unix_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(ListenerError, match="exists and is not a socket"):
        bind_listeners([f"unix:{path}"])
    assert path.read_text() == "keep me"


def test_abstract_unix_socket(bound: list[Listener]) -> None:
    name = f"farm-test-{uuid.uuid4().hex}"
    [listener] = _bind(bound, f"unix:@{name}")
    assert listener.bound == f"unix:@{name}"
    _assert_serves(listener)


def test_forked_child_close_keeps_the_socket_file(tmp_path: Path) -> None:
    """A worker closing its copy never removes the supervisor's socket file."""
    path = tmp_path / "kept.sock"
    [listener] = bind_listeners([f"unix:{path}"])
    try:
        code, message = in_child(lambda: (listener.close(), "")[1])
        assert code == 0, message
        assert path.exists()
    finally:
        listener.close()
    assert not path.exists()


# --- fd:// -------------------------------------------------------------------------------------


def test_adopt_fd(bound: list[Listener]) -> None:
    original = socket.create_server(("127.0.0.1", 0))
    fd = os.dup(original.fileno())
    original.close()
    [listener] = _bind(bound, f"fd://{fd}")
    assert listener.fileno() == fd
    assert listener.address == listener.name == f"fd://{fd}"
    assert listener.bound.startswith("127.0.0.1:")
    _assert_listener_flags(listener)
    _assert_serves(listener)


def test_adopt_fd_refuses_a_socket_that_is_not_listening() -> None:
    with socket.socket() as sock:
        with pytest.raises(ListenerError) as info:
            bind_listeners([f"fd://{sock.fileno()}"])
        assert str(info.value) == f"cannot adopt fd://{sock.fileno()}: the socket is not listening"
        os.fstat(sock.fileno())  # still open: a refused fd is not closed


def test_adopt_fd_refuses_a_datagram_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ListenerError, match="not a stream socket"):
            bind_listeners([f"fd://{sock.fileno()}"])
        os.fstat(sock.fileno())


def test_adopt_fd_refuses_a_file(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as file:
        with pytest.raises(ListenerError, match=rf"cannot adopt fd://{file.fileno()}: .*socket"):
            bind_listeners([f"fd://{file.fileno()}"])
        os.fstat(file.fileno())


def test_adopt_closed_fd() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(ListenerError, match=rf"cannot adopt fd://{fd}: \[Errno 9\]"):
        bind_listeners([f"fd://{fd}"])


# --- systemd LISTEN_FDS ------------------------------------------------------------------------


def test_inherit_ignores_variables_for_another_process() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert inherit_systemd_listeners(environ) is None
    assert environ == {}  # unset all the same, so children do not misread them


def test_inherit_without_variables() -> None:
    environ = {"PATH": "/bin"}
    assert inherit_systemd_listeners(environ) is None
    assert environ == {"PATH": "/bin"}


def test_inherit_rejects_malformed_variables() -> None:
    with pytest.raises(ListenerError, match="invalid LISTEN_FDS='two'"):
        inherit_systemd_listeners({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"})
    with pytest.raises(ListenerError, match="invalid LISTEN_PID='me'"):
        inherit_systemd_listeners({"LISTEN_PID": "me", "LISTEN_FDS": "1"})


def test_inherit_zero_fds() -> None:
    assert inherit_systemd_listeners({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []


# Run in a fresh interpreter: moves the passed sockets onto fds 3.., sets LISTEN_PID to its own
# pid (as systemd does after fork), adopts them and reports what it got.
_CHILD = textwrap.dedent(
    """
    import fcntl, json, os, sys
    fds = [int(fd) for fd in sys.argv[1].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)
        os.close(fd)
    os.environ.update(
        LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2]
    )
    from farm.supervisor.listeners import inherit_systemd_listeners
    listeners = inherit_systemd_listeners()
    print(json.dumps({
        "listeners": [
            [l.fileno(), l.name, l.address, l.socket.getblocking(), l.socket.get_inheritable(),
             l.from_systemd]
            for l in listeners
        ],
        "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }))
    """
)


def test_inherit_systemd_listeners_in_a_child(tmp_path: Path) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "s.sock"))
    unix.listen()
    with tcp, unix:
        fds = [tcp.fileno(), unix.fileno()]
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, ",".join(map(str, fds)), "smtp:submission"],
            pass_fds=fds,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        port = tcp.getsockname()[1]
    assert report["listeners"] == [
        [3, "smtp", f"127.0.0.1:{port}", False, True, True],
        [4, "submission", f"unix:{tmp_path / 's.sock'}", False, True, True],
    ]
    assert report["left"] == []


def test_inherit_refuses_a_non_listening_fd() -> None:
    with socket.socket() as sock:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(sock.fileno()), "smtp"],
            pass_fds=[sock.fileno()],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert "ListenerError: cannot adopt systemd fd 3 (smtp): the socket is not listening" in (
        result.stderr
    )


_ACTIVATED = textwrap.dedent(
    """
    import json, os
    from farm.supervisor.listeners import inherit_systemd_listeners
    listeners = inherit_systemd_listeners()
    for listener in listeners:
        listener.socket.settimeout(10)
    conn, _ = listeners[0].socket.accept()
    conn.sendall(json.dumps([[l.name, l.bound] for l in listeners]).encode())
    conn.close()
    """
)


@pytest.mark.skipif(
    not shutil.which("systemd-socket-activate"), reason="no systemd-socket-activate"
)
def test_systemd_socket_activate_hands_over_named_sockets() -> None:
    smtp, submission = free_port(), free_port()
    process = subprocess.Popen(
        [
            "systemd-socket-activate",
            f"--listen=127.0.0.1:{smtp}",
            f"--listen=127.0.0.1:{submission}",
            "--fdname=smtp:submission",
            f"--setenv=PYTHONPATH={ROOT}",
            sys.executable,
            "-c",
            _ACTIVATED,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        client = _connect_retrying(("127.0.0.1", smtp), process)
        with client:
            client.settimeout(20)
            data = b""
            while chunk := client.recv(4096):
                data += chunk
        assert json.loads(data) == [
            ["smtp", f"127.0.0.1:{smtp}"],
            ["submission", f"127.0.0.1:{submission}"],
        ]
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr


def _connect_retrying(address: tuple[str, int], process: subprocess.Popen[bytes]) -> socket.socket:
    def connected() -> socket.socket | None:
        try:
            return socket.create_connection(address, timeout=5)
        except ConnectionRefusedError:
            if process.poll() is not None:
                raise
            return None

    return wait_for(connected, f"{address} accepting connections")


# --- accept queue ------------------------------------------------------------------------------


def test_accept_queue_depth(bound: list[Listener], tmp_path: Path) -> None:
    [listener] = _bind(bound, "127.0.0.1:0", backlog=8)
    assert accept_queue(listener.socket) == (0, 8)
    clients = [socket.create_connection(listener.socket.getsockname(), 5) for _ in range(3)]
    try:
        wait_for(lambda: accept_queue(listener.socket) == (3, 8), "3 connections queued")
        assert accept_queue(listener.socket) == (3, 8)
    finally:
        for client in clients:
            client.close()
    [unix] = _bind(bound, f"unix:{tmp_path / 'q.sock'}")
    assert accept_queue(unix.socket) is None


# --- privileges --------------------------------------------------------------------------------


def _drop_and_report(user: str | None, group: str | None) -> str:
    drop_privileges(user, group)
    ids = {"uid": os.getresuid(), "gid": os.getresgid(), "groups": os.getgroups()}
    try:
        os.setuid(0)
    except PermissionError:
        ids["regain"] = "refused"
    else:
        ids["regain"] = "root again"
    return json.dumps(ids)


@needs_root
def test_drop_privileges_to_nobody_is_irrevocable() -> None:
    code, message = in_child(lambda: _drop_and_report("nobody", None))
    assert code == 0, message
    assert json.loads(message) == {
        "uid": [65534, 65534, 65534],
        "gid": [65534, 65534, 65534],
        "groups": [],
        "regain": "refused",
    }


@needs_root
def test_drop_privileges_numeric_ids() -> None:
    code, message = in_child(lambda: _drop_and_report("65534", "65534"))
    assert code == 0, message
    assert json.loads(message)["uid"] == [65534, 65534, 65534]
    assert json.loads(message)["regain"] == "refused"


@needs_root
def test_drop_privileges_needs_root() -> None:
    def body() -> str:
        drop_privileges("nobody", None)
        drop_privileges("nobody", None)  # already that user: a no-op
        try:
            drop_privileges("root", None)
        except PrivilegeError as error:
            return str(error)
        return "became root"

    code, message = in_child(body)
    assert code == 0, message
    assert message == "cannot switch to user root: not running as root (uid 65534)"


def test_drop_privileges_unknown_names() -> None:
    with pytest.raises(PrivilegeError, match="unknown user 'no-such-farm-user'"):
        drop_privileges("no-such-farm-user", None)
    with pytest.raises(PrivilegeError, match="unknown group 'no-such-farm-group'"):
        drop_privileges(None, "no-such-farm-group")


def test_drop_privileges_nothing_to_do() -> None:
    before = (os.getresuid(), os.getresgid(), os.getgroups())
    drop_privileges(None, None)
    assert (os.getresuid(), os.getresgid(), os.getgroups()) == before
