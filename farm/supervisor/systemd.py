"""sd_notify(3) without libsystemd: datagrams of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``.

Only the supervisor talks to systemd (``NotifyAccess=main``); workers report to the supervisor.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("farm.supervisor")


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, the clock systemd expects in ``MONOTONIC_USEC``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Tells systemd about readiness, reloads, stops, status and liveness.

    A no-op when ``NOTIFY_SOCKET`` is unset. Sending never raises: the first failure is logged
    at WARNING on ``farm.supervisor``, later ones at DEBUG. Every method returns whether the
    datagram was sent.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_path: str | None = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when systemd listens (``NOTIFY_SOCKET`` is set)."""
        return self.socket_path is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or ``None``.

        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is unset or is this process.
        """
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        return self.notify("READY=1", status=status)

    def reloading(self, status: str | None = None) -> bool:
        """A reload starts; finish it with :meth:`ready`."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", status=status)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self.notify("STOPPING=1", status=status)

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(status=text)

    def watchdog(self) -> bool:
        """Keep-alive ping; send every :attr:`watchdog_interval` while healthy."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start/stop/reload timeout fires."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def notify(self, *lines: str, status: str | None = None) -> bool:
        """Send ``lines`` (``KEY=VALUE``) and an optional ``STATUS=`` as one datagram."""
        if self.socket_path is None:
            return False
        fields = list(lines)
        if status is not None:
            fields.append("STATUS=" + " ".join(status.splitlines()))
        if not fields:
            return False
        return self._send("\n".join(fields).encode())

    def _send(self, data: bytes) -> bool:
        path = self.socket_path or ""
        if path.startswith("@"):
            address = "\0" + path[1:]
        elif path.startswith("/"):
            address = path
        else:
            self._failed(f"unsupported NOTIFY_SOCKET={path!r}")
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(1.0)
                sock.sendto(data, address)
        except OSError as error:
            self._failed(f"cannot notify systemd at {path}: {error}")
            return False
        return True

    def _failed(self, message: str) -> None:
        if self._warned:
            log.debug("%s", message)
        else:
            self._warned = True
            log.warning("%s (further failures are logged at DEBUG)", message)
