"""Controllers: run one SMTP server in a thread (or on your loop), with start/stop semantics.

The API is aiosmtpd's. Unlike aiosmtpd, ``stop()`` drains: transactions in flight finish
(within ``drain_timeout``), idle sessions are told ``421 4.3.2 Service shutting down``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import ssl
import threading
import time
from typing import Any

from farm.smtp import SMTP
from farm.smtp.drain import SessionTracker

log = logging.getLogger("farm.controller")

DEFAULT_READY_TIMEOUT = 1.0
DEFAULT_DRAIN_TIMEOUT = 30.0


@functools.cache
def get_localhost() -> str:
    """``::1`` when IPv6 loopback works on this host, else ``127.0.0.1``."""
    if not socket.has_ipv6:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        if error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return "127.0.0.1"
        raise
    return "::1"


class _BaseController:
    """What every controller shares: the SMTP factory, session tracking and draining."""

    def __init__(
        self,
        handler: Any,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        server_kwargs: dict[str, Any] | None = None,
        drain_timeout: float | None = DEFAULT_DRAIN_TIMEOUT,
        **SMTP_parameters: Any,
    ) -> None:
        self.handler = handler
        self._owns_loop = loop is None
        self.loop = asyncio.new_event_loop() if loop is None else loop
        self.ready_timeout = float(os.getenv("AIOSMTPD_CONTROLLER_TIMEOUT", ready_timeout))
        self.ssl_context = ssl_context
        self.drain_timeout = drain_timeout
        self.SMTP_kwargs: dict[str, Any] = {}
        if server_kwargs:
            self.SMTP_kwargs.update(server_kwargs)
        self.SMTP_kwargs.update(SMTP_parameters)
        if server_hostname:
            self.SMTP_kwargs["hostname"] = server_hostname
        self.SMTP_kwargs.setdefault("enable_SMTPUTF8", True)
        self.server: asyncio.AbstractServer | None = None
        self.server_coro: Any = None
        self.smtpd: Any = None
        self._sessions = SessionTracker()
        self._factory_invoked = threading.Event()
        self._thread_exception: BaseException | None = None

    def factory(self) -> SMTP:
        """Build the protocol for one connection; override to serve LMTP or custom kwargs."""
        return SMTP(self.handler, **self.SMTP_kwargs)

    def _factory_invoker(self) -> Any:
        try:
            self.smtpd = self._sessions.add(self.factory())
            if self.smtpd is None:
                raise RuntimeError("factory() returned None")
            return self.smtpd
        except Exception as error:
            self._thread_exception = error
            raise
        finally:
            self._factory_invoked.set()

    async def _create_server(self) -> asyncio.AbstractServer:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        """Stop accepting, drain the sessions, wait for the server to close."""
        if self.server is not None:
            self.server.close()
        await self._sessions.drain(self.drain_timeout)
        if self.server is not None:
            await self.server.wait_closed()
        close = getattr(self.handler, "aclose", None)
        if close is not None:  # connections it keeps on this loop (the relay's pool)
            try:
                await asyncio.wait_for(close(), self.drain_timeout)
            except Exception as error:
                log.warning("handler aclose() failed: %s", error or type(error).__name__)

    def _trigger_server(self) -> None:
        """Connect once and read the greeting, proving the factory works."""
        with self._connect() as sock:
            sock.settimeout(max(self.ready_timeout, 1.0))
            if not self._factory_invoked.wait(self.ready_timeout) or self._thread_exception:
                return
            if self.SMTP_kwargs.get("proxy_protocol_timeout"):
                return  # the server waits for a PROXY header: no greeting to read
            if self.ssl_context is not None:
                client = ssl.create_default_context()
                client.check_hostname = False
                client.verify_mode = ssl.CERT_NONE
                sock = client.wrap_socket(sock)
            try:
                sock.recv(1024)
            except OSError:
                pass
            finally:
                sock.close()

    def _connect(self) -> socket.socket:
        raise NotImplementedError


class _ThreadedMixin(_BaseController):
    """Runs the server on its own loop in a daemon thread."""

    _thread: threading.Thread | None = None

    def _run(self, ready_event: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server_coro = self._create_server()
            self.server = self.loop.run_until_complete(self.server_coro)
        except Exception as error:
            self._thread_exception = error
            ready_event.set()
            return
        self.loop.call_soon(ready_event.set)
        self.loop.run_forever()
        self.server = None
        self._cancel_tasks()

    def _cancel_tasks(self) -> None:
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def start(self) -> None:
        """Start the server in a daemon thread; raise if it is not serving in time."""
        assert self._thread is None, "SMTP daemon already running"
        if self._owns_loop and self.loop.is_closed():
            self.loop = asyncio.new_event_loop()
        self._factory_invoked.clear()
        self._thread_exception = None
        self.smtpd = None
        ready_event = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready_event,), daemon=True)
        self._thread.start()
        started = time.monotonic()
        if not ready_event.wait(self.ready_timeout) or self._thread_exception is not None:
            self._thread.join(self.ready_timeout)
            self._thread = None
            if (
                self._owns_loop
                and self._thread_exception is not None
                and not self.loop.is_running()
            ):
                self.loop.close()
            if self._thread_exception is not None:
                raise self._thread_exception
            raise TimeoutError("SMTP server failed to start within allotted time")
        self._trigger_server()
        remaining = max(self.ready_timeout - (time.monotonic() - started), 0.1)
        if not self._factory_invoked.wait(remaining):
            raise TimeoutError("SMTP server started, but not responding within allotted time")
        if self._thread_exception is not None:
            self.stop()
            raise self._thread_exception  # type: ignore[misc]
        if self.smtpd is None:
            raise RuntimeError("Unknown Error, failed to init SMTP server")

    def stop(self, no_assert: bool = False) -> None:
        """Drain the sessions, stop the server and the loop, and join the thread."""
        assert no_assert or self._thread is not None, "SMTP daemon not running"
        thread = self._thread
        if thread is not None and thread.is_alive() and not self.loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            try:
                future.result(None if self.drain_timeout is None else self.drain_timeout + 10)
            except Exception:
                log.exception("controller: draining the server failed; stopping anyway")
            self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join()
        self._thread = None
        self.server = None
        self.smtpd = None
        if self._owns_loop and not self.loop.is_closed():
            self.loop.close()


class _TCPMixin(_BaseController):
    hostname: str
    port: int

    def _setup_tcp(self, hostname: str | None, port: int) -> None:
        self.hostname = get_localhost() if hostname is None else hostname
        self.port = port

    async def _create_server(self) -> asyncio.AbstractServer:
        server = await self.loop.create_server(
            self._factory_invoker, host=self.hostname, port=self.port, ssl=self.ssl_context
        )
        if self.port == 0:
            self.port = server.sockets[0].getsockname()[1]
        return server

    def _connect(self) -> socket.socket:
        return socket.create_connection((self.hostname or "localhost", self.port), timeout=5)


class _UnixMixin(_BaseController):
    unix_socket: str

    async def _create_server(self) -> asyncio.AbstractServer:
        return await self.loop.create_unix_server(
            self._factory_invoker, path=self.unix_socket, ssl=self.ssl_context
        )

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(self.unix_socket)
        return sock


class Controller(_ThreadedMixin, _TCPMixin):
    """An SMTP server on ``hostname:port``, run in a thread with its own event loop."""

    def __init__(
        self,
        handler: Any,
        hostname: str | None = None,
        port: int = 8025,
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, loop, **kwargs)
        self._setup_tcp(hostname, port)


class UnixSocketController(_ThreadedMixin, _UnixMixin):
    """An SMTP server on a Unix socket, run in a thread with its own event loop."""

    def __init__(
        self,
        handler: Any,
        unix_socket: str | os.PathLike[str],
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, loop, **kwargs)
        self.unix_socket = os.fspath(unix_socket)


class _UnthreadedMixin(_BaseController):
    """Runs the server on a loop you own: ``begin()``, run the loop, ``end()``."""

    def begin(self) -> None:
        """Create the server on the (not yet running) loop."""
        asyncio.set_event_loop(self.loop)
        self.server_coro = self._create_server()
        self.server = self.loop.run_until_complete(self.server_coro)

    async def finalize(self) -> None:
        """Drain and close the server from inside the running loop."""
        await self._shutdown()

    def end(self) -> None:
        """Drain and close the server; safe whether or not the loop is running."""
        if self.loop.is_running():
            self.loop.create_task(self.finalize())
        else:
            self.loop.run_until_complete(self.finalize())
        self.server = None


class UnthreadedController(_UnthreadedMixin, _TCPMixin):
    """An SMTP server on ``hostname:port`` that runs on your event loop."""

    def __init__(
        self,
        handler: Any,
        hostname: str | None = None,
        port: int = 8025,
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, loop, **kwargs)
        self._setup_tcp(hostname, port)


class UnixSocketUnthreadedController(_UnthreadedMixin, _UnixMixin):
    """An SMTP server on a Unix socket that runs on your event loop."""

    def __init__(
        self,
        handler: Any,
        unix_socket: str | os.PathLike[str],
        loop: asyncio.AbstractEventLoop | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, loop, **kwargs)
        self.unix_socket = os.fspath(unix_socket)
