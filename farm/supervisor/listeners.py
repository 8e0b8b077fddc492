"""Listening sockets: bind them, adopt an open fd (``fd://N``) or systemd's ``LISTEN_FDS``.

Only the supervisor binds. Every listener is non-blocking and inheritable so that forked workers
accept on the very same kernel socket; a worker's death never closes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import sys
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

log = logging.getLogger("farm.supervisor")

SD_LISTEN_FDS_START = 3
"""The first file descriptor systemd passes (``SD_LISTEN_FDS_START`` in sd-daemon.h)."""

_SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ListenerError(Exception):
    """A listener could not be bound or adopted; ``str()`` is one line naming the address."""


class AddressLike(Protocol):
    """What :func:`bind_listeners` needs from a parsed address (``farm.addresses.Address``)."""

    @property
    def kind(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def host(self) -> str | None: ...
    @property
    def port(self) -> int | None: ...
    @property
    def path(self) -> str | None: ...
    @property
    def fd(self) -> int | None: ...


@dataclass(frozen=True)
class Listener:
    """One listening socket.

    ``address`` is the configured address text (``127.0.0.1:0``, ``unix:/run/farm.sock``,
    ``fd://3``), or the socket's own address for systemd-passed sockets; ``name`` is systemd's
    ``FileDescriptorName`` or else the address. :attr:`bound` is where it really listens.
    """

    socket: socket.socket
    address: str
    name: str
    from_systemd: bool = False
    """True for a socket passed by systemd (``LISTEN_FDS``): the unit owns its address."""
    unix_path: str | None = field(default=None, repr=False)
    """The socket file this process created (removed by :meth:`close` in the same process)."""
    owner_pid: int = field(default_factory=os.getpid, repr=False, compare=False)

    def fileno(self) -> int:
        return self.socket.fileno()

    @property
    def bound(self) -> str:
        """The address the socket is bound to, e.g. ``127.0.0.1:41234`` or ``unix:/run/x``."""
        return format_sockname(self.socket)

    def close(self) -> None:
        """Close the socket; in the process that bound it, also remove its socket file."""
        self.socket.close()
        if self.unix_path is not None and os.getpid() == self.owner_pid:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.unix_path).st_mode):
                    os.unlink(self.unix_path)


def format_sockname(sock: socket.socket) -> str:
    """``host:port``, ``[v6]:port``, ``unix:/path`` or ``unix:@abstract`` for a bound socket."""
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    if sock.family == socket.AF_INET:
        return f"{name[0]}:{name[1]}"
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):  # abstract names come back as bytes
            return "unix:@" + name.lstrip(b"\0").decode(errors="replace")
        return f"unix:{name}" if name else "unix:"
    return str(name)


def bind_listeners(
    addresses: Iterable[AddressLike | str],
    *,
    backlog: int = 1024,
    unix_mode: int | None = 0o666,
    unix_owner: tuple[int, int] | None = None,
) -> list[Listener]:
    """Bind (or adopt) every address; all or nothing.

    Strings are parsed with :func:`farm.addresses.parse_address`. ``unix_mode`` is applied to
    Unix socket files (``None`` leaves the umask's result); ``unix_owner`` is a ``(uid, gid)``
    to chown them to (``-1`` keeps one unchanged). Raises :class:`ListenerError`; on error
    the listeners bound so far are closed again.
    """
    listeners: list[Listener] = []
    try:
        for item in addresses:
            address = _parse(item)
            if address.kind == "tcp":
                listeners.append(_bind_tcp(address, backlog))
            elif address.kind == "unix":
                listeners.append(_bind_unix(address, backlog, unix_mode, unix_owner))
            elif address.kind == "fd":
                listeners.append(_adopt_fd(address))
            else:
                raise ListenerError(f"cannot bind {address.text}: unknown kind {address.kind!r}")
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def close_listeners(listeners: Iterable[Listener]) -> None:
    """Close every listener (see :meth:`Listener.close`)."""
    for listener in listeners:
        listener.close()


def _parse(item: AddressLike | str) -> AddressLike:
    if not isinstance(item, str):
        return item
    from farm.addresses import parse_address

    try:
        return parse_address(item)
    except ValueError as error:
        raise ListenerError(str(error)) from None


def _finish(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.set_inheritable(True)


def _bind_tcp(address: AddressLike, backlog: int) -> Listener:
    text = address.text
    try:
        infos = socket.getaddrinfo(
            address.host,
            address.port,
            socket.AF_UNSPEC,
            socket.SOCK_STREAM,
            0,
            socket.AI_PASSIVE,
        )
    except (OSError, UnicodeError) as error:
        raise ListenerError(f"cannot resolve {text}: {error}") from None
    family, kind, proto, _, sockaddr = infos[0]  # like gunicorn/aiosmtpd: the first result
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # [::]:25 must not also claim IPv4, so that 0.0.0.0:25 can be bound beside it.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return Listener(socket=_listen(sock, sockaddr, text, backlog), address=text, name=text)


def _listen(sock: socket.socket, sockaddr: Any, text: str, backlog: int) -> socket.socket:
    """Bind and listen, or close the socket and raise a one-line ListenerError."""
    try:
        sock.bind(sockaddr)
        sock.listen(backlog)
        _finish(sock)
    except OSError as error:
        sock.close()
        raise ListenerError(f"cannot bind {text}: {error}") from None
    return sock


def _bind_unix(
    address: AddressLike, backlog: int, mode: int | None, owner: tuple[int, int] | None
) -> Listener:
    text = address.text
    path = address.path or ""
    if path.startswith("@"):  # Linux abstract namespace: no file, no mode, no owner
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        return Listener(
            socket=_listen(sock, "\0" + path[1:], text, backlog), address=text, name=text
        )

    _remove_stale_socket(text, path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    created = False
    # Create the file with no more permission than asked, so it is never briefly too open.
    old_umask = os.umask(0o777 & ~mode) if mode is not None else None
    try:
        try:
            sock.bind(path)
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        created = True
        if mode is not None:
            os.chmod(path, mode)
        if owner is not None:
            os.chown(path, owner[0], owner[1])
        sock.listen(backlog)
        _finish(sock)
    except OSError as error:
        sock.close()
        if created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise ListenerError(f"cannot bind {text}: {error}") from None
    return Listener(socket=sock, address=text, name=text, unix_path=path)


def _remove_stale_socket(text: str, path: str) -> None:
    """Unlink ``path`` if it is a socket file nobody listens on; refuse anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise ListenerError(f"cannot bind {text}: {error}") from None
    if not stat.S_ISSOCK(mode):
        raise ListenerError(f"cannot bind {text}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: nothing listens on it any more
    except (TimeoutError, BlockingIOError):  # a listener with a full accept queue
        raise ListenerError(f"cannot bind {text}: another process is listening on {path}") from None
    except OSError as error:
        raise ListenerError(f"cannot bind {text}: {error}") from None
    else:
        raise ListenerError(f"cannot bind {text}: another process is listening on {path}")
    finally:
        probe.close()
    log.info("removing stale socket file %s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _adopt(fd: int, label: str) -> socket.socket:
    """A socket object owning ``fd``, after checking it is a listening stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        raise ListenerError(f"cannot adopt {label}: {error}") from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ListenerError(f"cannot adopt {label}: not a stream socket ({sock.type!r})")
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError as error:
            raise ListenerError(f"cannot adopt {label}: {error}") from None
        if not listening:
            raise ListenerError(f"cannot adopt {label}: the socket is not listening")
        _finish(sock)
    except ListenerError:
        sock.detach()  # not ours to close
        raise
    return sock


def _adopt_fd(address: AddressLike) -> Listener:
    if address.fd is None:
        raise ListenerError(f"cannot adopt {address.text}: no file descriptor number")
    sock = _adopt(address.fd, address.text)
    return Listener(socket=sock, address=address.text, name=address.text)


def inherit_systemd_listeners(
    environ: MutableMapping[str, str] = os.environ,
) -> list[Listener] | None:
    """Adopt the sockets systemd passed (``LISTEN_FDS`` from fd 3, named by ``LISTEN_FDNAMES``).

    Returns ``None`` when the variables are absent or meant for another process (``LISTEN_PID``
    is not ours). The variables are removed from ``environ`` in every case, so children do not
    misread them. Raises :class:`ListenerError` for malformed variables or a passed fd that is not
    a listening stream socket (``Accept=yes`` units are not supported).
    """
    values = {key: environ.pop(key, None) for key in _SYSTEMD_VARIABLES}
    pid_text, count_text, names_text = values.values()
    if pid_text is None or count_text is None:
        return None
    try:
        pid = int(pid_text)
    except ValueError:
        raise ListenerError(f"invalid LISTEN_PID={pid_text!r}") from None
    if pid != os.getpid():
        return None
    try:
        count = int(count_text)
        if count < 0:
            raise ValueError
    except ValueError:
        raise ListenerError(f"invalid LISTEN_FDS={count_text!r}") from None
    names: list[str | None] = [None] * count
    if names_text is not None:
        parts = names_text.split(":")
        if len(parts) == count:
            names = list(parts)
        else:
            log.warning("ignoring LISTEN_FDNAMES: %d name(s) for %d socket(s)", len(parts), count)
    listeners: list[Listener] = []
    try:
        for index in range(count):
            fd = SD_LISTEN_FDS_START + index
            name = names[index]
            label = f"systemd fd {fd}" + (f" ({name})" if name else "")
            sock = _adopt(fd, label)
            bound = format_sockname(sock)
            listeners.append(
                Listener(socket=sock, address=bound, name=name or bound, from_systemd=True)
            )
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


class AcceptQueue(NamedTuple):
    """A listening TCP socket's accept queue: connections waiting, and the backlog limit."""

    length: int
    limit: int


_TCP_INFO_UNACKED = struct.Struct("=II")  # tcpi_unacked, tcpi_sacked at offset 24
_TCP_INFO_OFFSET = 24


def accept_queue(sock: socket.socket) -> AcceptQueue | None:
    """The accept-queue depth of a listening TCP socket (Linux ``TCP_INFO``), else ``None``.

    For a listener the kernel reports the queue length in ``tcpi_unacked`` and the backlog in
    ``tcpi_sacked``. This is the saturation signal: connections the kernel has completed that no
    worker has accepted yet.
    """
    if not sys.platform.startswith("linux") or sock.family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < _TCP_INFO_OFFSET + _TCP_INFO_UNACKED.size:
        return None
    length, limit = _TCP_INFO_UNACKED.unpack_from(info, _TCP_INFO_OFFSET)
    return AcceptQueue(length, limit)
