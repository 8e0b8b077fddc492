"""Controllers: run one SMTP server in a thread (or on your loop), with start/stop semantics.

The API is aiosmtpd's. Unlike aiosmtpd, ``stop()`` drains: transactions in flight finish
(within ``drain_timeout``), idle sessions are told ``421 4.3.2 Service shutting down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import threading
import time
import warnings
from typing import Any

from farm.smtp import SMTP
from farm.smtp.drain import SessionTracker

log = logging.getLogger("farm.controller")

DEFAULT_READY_TIMEOUT = 5.0
DEFAULT_DRAIN_TIMEOUT = 30.0

#: The errors ``start()`` raises when the server is not ready within ``ready_timeout``.
NOT_STARTED = (
    "SMTP server failed to start within allotted time. "
    "This might happen if the system is too busy. "
    "Try increasing the `ready_timeout` parameter."
)
NOT_RESPONDING = (
    "SMTP server started, but not responding within allotted time. "
    "This might happen if the system is too busy. "
    "Try increasing the `ready_timeout` parameter."
)
#: errno values of binding ``::1`` that mean: no IPv6 loopback here / IPv6 works.
_NO_IPV6 = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})
_HAS_IPV6 = frozenset({errno.EADDRINUSE})


def get_localhost() -> str:
    """``::1`` when IPv6 loopback works on this host, else ``127.0.0.1``.

    Errors other than "no such address/family" (and "in use", which proves IPv6 works) are
    raised: they are worth knowing about.
    """
    if not socket.has_ipv6:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        if error.errno in _NO_IPV6:
            return "127.0.0.1"
        if error.errno not in _HAS_IPV6:
            raise
    return "::1"


def _server_to_client_ssl_ctx(server_context: ssl.SSLContext) -> ssl.SSLContext:
    """A client context able to reach our own TLS listener (no verification: loopback)."""
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    client.options = server_context.options
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return client


class _RefusedConnection(asyncio.Protocol):
    """Serves a connection when ``factory()`` failed: closes it at once, quietly."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class BaseController:
    """What every controller shares: the SMTP factory, session tracking and draining."""

    smtpd: Any = None
    server: asyncio.AbstractServer | None = None
    server_coro: Any = None
    _thread_exception: BaseException | None = None
    #: Seconds the connection made by ``_trigger_server`` may wait (what is left of
    #: ``ready_timeout`` when started from ``start()``).
    _trigger_timeout = 5.0

    def __init__(
        self,
        handler: Any,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        drain_timeout: float | None = DEFAULT_DRAIN_TIMEOUT,
        **SMTP_parameters: Any,
    ) -> None:
        self.handler = handler
        self._owns_loop = loop is None
        self.loop = asyncio.new_event_loop() if loop is None else loop
        self.ssl_context = ssl_context
        self.drain_timeout = drain_timeout
        self.SMTP_kwargs: dict[str, Any] = {}
        if "server_kwargs" in SMTP_parameters:
            warnings.warn(
                "server_kwargs will be removed in version 2.0. "
                "Pass the keyword arguments for SMTP to the controller itself.",
                DeprecationWarning,
                stacklevel=3,
            )
            self.SMTP_kwargs.update(SMTP_parameters.pop("server_kwargs") or {})
        self.SMTP_kwargs.update(SMTP_parameters)
        if server_hostname:
            self.SMTP_kwargs["hostname"] = server_hostname
        self.SMTP_kwargs.setdefault("enable_SMTPUTF8", True)
        self._sessions = SessionTracker()
        self._factory_invoked = threading.Event()

    def factory(self) -> SMTP:
        """Build the protocol for one connection; override to serve LMTP or custom kwargs."""
        return SMTP(self.handler, **self.SMTP_kwargs)

    def _factory_invoker(self) -> asyncio.BaseProtocol:
        """Call ``factory()``; if it fails, keep the error for ``start()`` and close the client."""
        try:
            self.smtpd = self.factory()
            if self.smtpd is None:
                raise RuntimeError("factory() returned None")
            return self._sessions.add(self.smtpd)
        except Exception as error:
            self._thread_exception = error
            return _RefusedConnection()
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

    def _cleanup(self) -> None:
        """Forget the last run (so the controller can start again)."""
        self._thread_exception = None
        self._factory_invoked.clear()
        self.server_coro = None
        self.server = None
        self.smtpd = None

    def cancel_tasks(self, stop_loop: bool = True) -> None:
        """Stop the loop and cancel its tasks (call it on the loop: call_soon_threadsafe)."""
        if stop_loop:
            self.loop.stop()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()

    def _trigger_server(self) -> None:
        """Connect once and read the greeting, so that the factory runs now."""
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(self._connect())
            if self.ssl_context is not None:
                client = _server_to_client_ssl_ctx(self.ssl_context)
                sock = stack.enter_context(client.wrap_socket(sock))
            if not self.SMTP_kwargs.get("proxy_protocol_timeout"):
                sock.recv(1024)  # (a server awaiting a PROXY header sends no greeting)

    def _connect(self) -> socket.socket:
        raise NotImplementedError


class BaseThreadedController(BaseController):
    """Runs the server on its own loop in a daemon thread: ``start()``, ``stop()``."""

    _thread: threading.Thread | None = None
    _stop_requested = False
    _stop_waiter: asyncio.Future[None] | None = None

    def __init__(
        self,
        handler: Any,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, loop, **kwargs)
        self.ready_timeout = float(os.getenv("AIOSMTPD_CONTROLLER_TIMEOUT", ready_timeout))

    def _run(self, ready_event: threading.Event) -> None:
        """The thread: serve until ``stop()``, then drain and close (the loop too, if ours)."""
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve(ready_event))
        except (RuntimeError, asyncio.CancelledError):
            pass  # the loop was stopped or the task cancelled from outside (cancel_tasks)
        finally:
            self._close_loop()

    async def _serve(self, ready_event: threading.Event) -> None:
        if self._stop_requested:
            return
        try:
            self.server_coro = self._create_server()
            self.server = await self.server_coro
        except Exception as error:
            self._thread_exception = error
            ready_event.set()
            return
        ready_event.set()
        try:
            if not self._stop_requested:
                self._stop_waiter = self.loop.create_future()
                await self._stop_waiter
            await self._shutdown()
        finally:
            if self.server is not None:
                self.server.close()

    def _request_stop(self) -> None:
        """On the loop: end ``_serve``."""
        self._stop_requested = True
        waiter = self._stop_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _close_loop(self) -> None:
        loop = self.loop
        if loop.is_closed() or loop.is_running():
            return
        tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        if self._owns_loop:
            loop.close()

    def start(self) -> None:
        """Start the server in a daemon thread; raise if it is not serving in time.

        After a failed start, ``stop()`` still cleans up (the thread may be about to serve).
        """
        assert self._thread is None, "SMTP daemon already running"
        if self._owns_loop and self.loop.is_closed():
            self.loop = asyncio.new_event_loop()
        self._cleanup()
        self._stop_requested = False
        self._stop_waiter = None
        ready_event = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready_event,), daemon=True)
        self._thread.start()
        started = time.monotonic()
        if not ready_event.wait(self.ready_timeout):
            if self._thread_exception is not None:
                raise self._thread_exception
            raise TimeoutError(NOT_STARTED)
        if self._thread_exception is not None:
            raise self._thread_exception  # binding failed
        respond_timeout = self.ready_timeout - (time.monotonic() - started)
        self._trigger_timeout = max(respond_timeout, 0.1)
        with contextlib.suppress(TimeoutError):  # whether the factory ran is checked next
            self._trigger_server()
        if not self._factory_invoked.wait(max(respond_timeout, 0.0)):
            raise TimeoutError(NOT_RESPONDING)
        if self._thread_exception is not None:
            raise self._thread_exception
        if self.smtpd is None:
            raise RuntimeError("Unknown Error, failed to init SMTP server")

    def stop(self, no_assert: bool = False) -> None:
        """Drain the sessions, close the server, end the thread (and close our loop)."""
        assert no_assert or self._thread is not None, "SMTP daemon not running"
        thread = self._thread
        if thread is not None:
            self._stop_requested = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: the thread ended
                self.loop.call_soon_threadsafe(self._request_stop)
            thread.join()
            self._thread = None
        self._cleanup()


class InetMixin(BaseController):
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
        # An empty hostname binds every address; the loopback one is among them.
        address = (self.hostname or get_localhost(), self.port)
        return socket.create_connection(address, timeout=self._trigger_timeout)


class UnixSocketMixin(BaseController):
    unix_socket: str

    async def _create_server(self) -> asyncio.AbstractServer:
        return await self.loop.create_unix_server(
            self._factory_invoker, path=self.unix_socket, ssl=self.ssl_context
        )

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._trigger_timeout)
        sock.connect(self.unix_socket)
        return sock


class Controller(BaseThreadedController, InetMixin):
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


class UnixSocketController(BaseThreadedController, UnixSocketMixin):
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


class BaseUnthreadedController(BaseController):
    """Runs the server on a loop you own: ``begin()``, run the loop, ``end()``."""

    def __init__(
        self, handler: Any, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        super().__init__(handler, loop, **kwargs)
        #: Set once ``end()`` (or ``finalize()``) has closed the server.
        self.ended = threading.Event()
        self._finalizing: asyncio.Task[None] | None = None

    def begin(self) -> None:
        """Create the server on the (not yet running) loop."""
        asyncio.set_event_loop(self.loop)
        self.server_coro = self._create_server()
        self.server = self.loop.run_until_complete(self.server_coro)

    async def finalize(self) -> None:
        """Drain and close the server from inside the running loop."""
        self.ended.clear()
        await self._shutdown()
        self._cleanup()
        self.ended.set()

    def end(self) -> None:
        """Drain and close the server; from inside the running loop it happens in a task
        (wait on ``ended``), else right here."""
        self.ended.clear()
        if self.loop.is_running():
            self._finalizing = self.loop.create_task(self.finalize())
        else:
            self.loop.run_until_complete(self.finalize())


class UnthreadedController(BaseUnthreadedController, InetMixin):
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


class UnixSocketUnthreadedController(BaseUnthreadedController, UnixSocketMixin):
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
