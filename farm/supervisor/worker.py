"""A worker process: one event loop serving SMTP on the listeners it inherited at fork.

It reports READY once serving, heartbeats (loop lag, sessions, messages) on its channel, stops
accepting at its session cap, drains on SIGTERM, stops at once on SIGINT/SIGQUIT, and exits when
the supervisor's end of the channel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import random
import signal
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry, generate_latest

from farm.handler_loading import HandlerLoadError, engine_factory, load_handler
from farm.logs import reopen_log_file, start_batching, stop_batching
from farm.metrics import StatsCollector, WorkerStats
from farm.pipeline import build_stages
from farm.scan.stage import ScanStage
from farm.smtp import SMTP
from farm.smtp.body import MemoryBudget
from farm.smtp.drain import SessionTracker
from farm.smtp.server import default_hostname
from farm.smtp.stages import Stages
from farm.supervisor.anvil import AnvilTable, SharedLimiter
from farm.supervisor.channel import Channel, ChannelClosed
from farm.supervisor.messages import (
    Heartbeat,
    Metrics,
    MetricsRequest,
    Ready,
    Recycle,
    ToSupervisor,
)
from farm.supervisor.privileges import PrivilegeError, drop_privileges
from farm.supervisor.session_guard import guarded

log = logging.getLogger("farm.worker")

#: Exit status of a worker that could not load its handler (a configuration error).
EXIT_BOOT_ERROR = 3
HEARTBEAT_INTERVAL = 1.0
#: Seconds the connections taken from the listen queue at a stop may take to be set up.
QUEUED_SETUP_TIMEOUT = 5.0
#: Seconds a handler's ``aclose()`` may take when the worker exits.
HANDLER_CLOSE_TIMEOUT = 5.0
#: Seconds a graceful stop gives sessions that have not begun a mail transaction to begin one.
UNBEGUN_GRACE = 1.0
#: Signals the supervisor handles. It blocks them around fork; a worker puts them back to their
#: defaults and unblocks them once its own loop handles them (TERM drain, INT/QUIT abort, HUP
#: retire, USR1 reopen logs), so that none is lost or fatal while it boots.
SUPERVISOR_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGCHLD,
)


@dataclass
class WorkerSpec:
    """Everything a freshly forked worker needs."""

    slot: int
    generation: int
    config: Any
    listeners: list[Any]
    channel: Channel
    #: Supervisor file descriptors the child must close.
    close_fds: list[int] = field(default_factory=list)
    #: The server's SSL context, loaded by the supervisor before any privilege drop.
    tls_context: Any = None
    #: The farm's per-client-IP counters, and this worker's region of sessions held.
    anvil: AnvilTable | None = None
    anvil_region: Any = None


def run_worker(spec: WorkerSpec) -> NoReturn:
    """The body of a forked child: never returns into the supervisor's code."""
    code = 1
    try:
        code = _worker_process(spec)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        with contextlib.suppress(BaseException):
            stop_batching()  # the lines logged before the traceback come first
        traceback.print_exc()
        code = 1
    finally:
        try:
            stop_batching()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _worker_process(spec: WorkerSpec) -> int:
    signal.set_wakeup_fd(-1)
    for signum in (*SUPERVISOR_SIGNALS, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    for fd in spec.close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    config = spec.config
    try:
        # Before any handler code runs; the TLS key was loaded by the supervisor.
        drop_privileges(config.user, config.group)
    except PrivilegeError as error:
        print(f"farm: worker {spec.slot}: {error}", file=sys.stderr, flush=True)
        return EXIT_BOOT_ERROR
    try:
        # As the user the worker now is: a spool it cannot write would fail every large message.
        tempfile.TemporaryFile(dir=config.smtp.spool_directory).close()
    except OSError as error:
        where = config.smtp.spool_directory or tempfile.gettempdir()
        print(
            f"farm: worker {spec.slot}: smtp.spool_directory: cannot create files in {where}: "
            f"{error.strerror or error}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_BOOT_ERROR
    try:
        from setproctitle import setproctitle

        setproctitle(f"farm: worker {spec.slot} gen {spec.generation}")
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
    loop = _new_loop(config.uvloop)
    asyncio.set_event_loop(loop)
    start_batching(loop)  # log lines written in batches, from now until the worker ends
    try:
        try:  # the handler, then the engine's check of it (WorkerServer builds the factory)
            handler = load_handler(config.handler, config.handler_args)
            server = WorkerServer(spec, handler, loop)
        except HandlerLoadError as error:
            print(f"farm: worker {spec.slot}: {error}", file=sys.stderr, flush=True)
            return EXIT_BOOT_ERROR
        code = loop.run_until_complete(server.run())
        loop.run_until_complete(_close_handler(handler))
        if server.scan_stage is not None:
            loop.run_until_complete(server.scan_stage.shutdown())
        server.send_final_metrics()
        return code
    finally:
        loop.close()


async def _close_handler(handler: Any) -> None:
    """Let a handler holding connections (the relay's pool) close them: ``aclose()``, bounded."""
    close = getattr(handler, "aclose", None)
    if close is None:
        return
    try:
        await asyncio.wait_for(close(), HANDLER_CLOSE_TIMEOUT)
    except Exception as error:  # the worker is exiting anyway: say why, go on
        log.warning("handler aclose() failed: %s", error or type(error).__name__)


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop()
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class AcceptGate:
    """Accepting on every listener, paused and resumed (at the session cap, in a drain).

    ``tls`` maps the listeners that speak TLS from the first byte to their SSL context; their
    connections are built by ``tls_factory`` (default: ``factory``).
    :meth:`close` stops accepting for good, taking what is queued first.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: list[Any],
        factory: Callable[[], asyncio.BaseProtocol],
        tls: dict[str, Any] | None = None,
        tls_factory: Callable[[], asyncio.BaseProtocol] | None = None,
    ) -> None:
        self._loop = loop
        self._listeners = listeners
        self._factory = factory
        self._tls_factory = tls_factory or factory
        self._tls = tls or {}
        self._epoch = 0  # bumped by stop(): a start() in progress then gives up
        self._servers: list[asyncio.AbstractServer] = []
        self._closed = False
        self.open = False

    async def start(self) -> None:
        if self.open or self._closed:
            return
        self.open = True
        epoch = self._epoch
        for listener in self._listeners:
            # A duplicate, so that pausing closes only this process's copy of the socket.
            sock = listener.socket.dup()
            ssl = self._tls.get(listener.address)
            factory = self._factory if ssl is None else self._tls_factory
            if sock.family == socket.AF_UNIX:
                server = await self._loop.create_unix_server(factory, sock=sock, ssl=ssl)
            else:
                server = await self._loop.create_server(factory, sock=sock, backlog=1024, ssl=ssl)
            if self._epoch != epoch:  # stopped while this server was being created
                self._close_servers([server])
                return
            self._servers.append(server)

    def stop(self) -> None:
        self.open = False
        self._epoch += 1
        servers, self._servers = self._servers, []
        self._close_servers(servers)

    def _close_servers(self, servers: list[asyncio.AbstractServer]) -> None:
        if not isinstance(self._loop, asyncio.selector_events.BaseSelectorEventLoop):
            for server in servers:  # uvloop accepts and attaches in one callback: no race
                server.close()
            return
        # asyncio accepts in one callback and attaches the transport in a task: a server closed
        # in between fails that task and loses the connection. So: no more accepts now, and
        # the close once the tasks already created have run (they were scheduled before it).
        for server in servers:
            for sock in server.sockets:
                self._loop.remove_reader(sock.fileno())
        if servers:
            self._loop.call_soon(_close_all, servers)

    async def close(self, take_queued: bool, timeout: float) -> int:
        """Stop accepting for good and close this process's copies of the listeners.

        With ``take_queued``, first accept (without blocking, until the queue is empty) every
        connection the kernel has queued, and serve them: when the last copy of a listener is
        closed, the kernel resets the connections still queued (clients already saw them
        connected), and from then on refuses new ones. Waits up to ``timeout`` s for the
        taken connections to be set up; returns how many were taken.
        """
        if self._closed:
            return 0
        self._closed = True
        self.stop()
        await asyncio.sleep(0)  # the servers' deferred close runs first
        taken: list[tuple[socket.socket, Any]] = []
        for listener in self._listeners:
            if take_queued:
                taken += [(conn, self._tls.get(listener.address)) for conn in _queued(listener)]
            listener.close()  # only this process's copy (the socket file is the supervisor's)
        if not taken:
            return 0
        loop = self._loop
        tasks = [
            loop.create_task(
                loop.connect_accepted_socket(
                    self._factory if ssl is None else self._tls_factory, conn, ssl=ssl
                )
            )
            for conn, ssl in taken
        ]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in tasks:
            if task not in pending and not task.cancelled() and task.exception() is not None:
                log.debug("a queued connection was lost: %s", task.exception())
        return len(taken)


def _close_all(servers: list[asyncio.AbstractServer]) -> None:
    for server in servers:
        server.close()


def _unbegun(protocol: SMTP) -> bool:
    """Whether a session has had no mail transaction yet (none in flight, none done)."""
    counts, envelope = protocol.counts, protocol.envelope
    in_flight = envelope is not None and envelope.mail_from is not None
    return not (in_flight or counts["accepted"] or counts["rejected"])


#: Connections taken from one listener's queue at most, as it closes.
MAX_QUEUED = 4096


def _queued(listener: Any) -> list[socket.socket]:
    """Accept, without blocking, what is queued on ``listener`` (nothing if it is not open)."""
    sock = listener.socket
    if sock.fileno() < 0:
        return []
    sock.setblocking(False)  # it is already; accept() must never wait here
    conns = []
    while len(conns) < MAX_QUEUED:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            break
        except OSError as error:  # out of descriptors, or the socket is not listening
            log.warning("cannot take the queued connections of %s: %s", listener.address, error)
            break
        conn.setblocking(False)
        conns.append(conn)
    return conns


class WorkerServer:
    """The worker's event-loop side: serving, heartbeats, the session cap and stopping."""

    def __init__(self, spec: WorkerSpec, handler: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.config = spec.config
        self.handler = handler
        self.loop = loop
        self.channel = spec.channel
        self.sessions = SessionTracker()
        self.stats = WorkerStats()
        self.stats.limit = self.config.max_sessions
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(StatsCollector(self.stats))
        self.active = 0
        self.messages = 0
        self._smtp_kwargs = self.config.smtp.as_kwargs(tls_context=spec.tls_context)
        # One budget for every session of this worker (the farm's: workers x the limit).
        self._smtp_kwargs["body_budget"] = MemoryBudget(self.config.body_memory_limit << 20)
        limits = self.config.limits.client_limits()
        self.limiter = None
        if limits.active and spec.anvil is not None:
            spec.anvil.forget_regions(keep=spec.anvil_region)  # the other workers' are not ours
            self.limiter = SharedLimiter(limits, spec.anvil, spec.anvil_region)
        if self.limiter is not None:
            self._smtp_kwargs["limiter"] = self.limiter
        stages = build_stages(self.config, self.stats)
        #: Its scanners' connections are closed when the worker ends.
        self.scan_stage = next((s for s in stages if isinstance(s, ScanStage)), None)
        if stages:
            self._smtp_kwargs["stages"] = Stages(stages)
        self._flushing = False
        #: Builds the sessions' protocols: made now, so that a handler the engine refuses (an
        #: EHLO hook of an unknown signature...) stops the worker's boot with a clear error
        #: instead of leaving every client unanswered.
        self._build_protocol = engine_factory(
            self.config.handler, handler, loop=loop, **self._smtp_kwargs
        )
        context = self._smtp_kwargs.get("tls_context")
        implicit = {a.text for a in self.config.tls_bind}
        tls = {
            listener.address: context
            for listener in spec.listeners
            if listener.address in implicit or listener.name in ("smtps", "submissions")
        }
        # The factories never raise (uvloop would close the listener for good): see guarded.
        hostname = self.config.smtp.hostname or default_hostname()
        self.gate = AcceptGate(
            loop,
            spec.listeners,
            guarded(self._new_session, hostname),
            tls,
            guarded(self._new_tls_session, hostname),
        )
        self._done = loop.create_future()
        self._stopping = False
        self._farm_stops = False
        self._recycle_at = self._recycle_threshold()
        self._recycle_asked = False
        self._beat_due = 0.0
        self._idle: asyncio.Future[None] | None = None

    def _recycle_threshold(self) -> int | None:
        if not self.config.max_messages:
            return None
        jitter = self.config.max_messages_jitter
        return self.config.max_messages + (random.randint(0, jitter) if jitter else 0)

    # -- sessions --------------------------------------------------------------------------

    def _new_session(self) -> SMTP:
        protocol = self._build_session()
        self._session_opened(protocol)
        return protocol

    def _new_tls_session(self) -> SMTP:
        """A session on a listener that speaks TLS from the first byte: counted once its
        handshake is done (``on_open``). A failed handshake never reaches the protocol
        (neither made nor lost, so no ``on_close``): it must count for nothing."""
        protocol = self._build_session()
        protocol.on_open = self._session_opened
        return protocol

    def _build_session(self) -> SMTP:
        protocol = self._build_protocol()
        protocol.on_close = self._session_closed
        protocol.stats = self.stats
        return protocol

    def _session_opened(self, protocol: SMTP) -> None:
        self.sessions.hold(protocol)  # until _session_closed
        self.active += 1
        stats = self.stats
        stats.connections += 1
        stats.active = self.active
        if self.active >= self.config.max_sessions and self.gate.open and not self._stopping:
            # Not from inside the factory: the connection being set up needs its server open.
            self.loop.call_soon(self._pause_at_cap)

    def _pause_at_cap(self) -> None:
        if self.active >= self.config.max_sessions and self.gate.open and not self._stopping:
            log.warning(
                "worker %d: %d sessions, at the cap: not accepting", self.spec.slot, self.active
            )
            self.gate.stop()

    def _session_closed(self, protocol: SMTP) -> None:
        self.sessions.release(protocol)
        self.active -= 1
        self.stats.active = self.active
        if not self.active and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        self.messages += protocol.counts["accepted"]
        if not self.gate.open and not self._stopping and self.active < self.config.max_sessions:
            self.loop.create_task(self.gate.start())
        if self._recycle_at is not None and self.messages >= self._recycle_at:
            self._ask_recycle("max_messages")

    def _ask_recycle(self, reason: str) -> None:
        if not self._recycle_asked:
            self._recycle_asked = True
            self._send(Recycle(reason))

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = self.loop
        loop.add_signal_handler(signal.SIGTERM, self.stop, True)
        loop.add_signal_handler(signal.SIGINT, self.stop, False)
        loop.add_signal_handler(signal.SIGQUIT, self.stop, False)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        loop.add_signal_handler(signal.SIGHUP, self.retire)
        for ignored in (signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(ignored, signal.SIG_IGN)
        # Blocked since the fork (see Arbiter._spawn): what arrived meanwhile is handled now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISOR_SIGNALS)
        loop.add_reader(self.channel.fileno(), self._on_channel)
        await self.gate.start()
        self._send(Ready())
        self._beat_due = loop.time() + HEARTBEAT_INTERVAL
        loop.call_at(self._beat_due, self._heartbeat)
        return await self._done

    def retire(self) -> None:
        """Stop accepting; let every session end by itself, within ``graceful_timeout``."""
        if self._stopping:
            return
        self._stopping = True
        self.gate.stop()
        self._idle = idle = self.loop.create_future()
        if not self.active:
            idle.set_result(None)
        self.loop.create_task(self._retire(idle))

    async def _retire(self, idle: asyncio.Future[None]) -> None:
        if not idle.done():
            try:
                await asyncio.wait_for(idle, self.config.graceful_timeout)
            except TimeoutError:
                log.info(
                    "worker %d: %d session(s) still open after %ss: draining",
                    self.spec.slot,
                    self.active,
                    self.config.graceful_timeout,
                )
        await self._stop(graceful=True)

    def stop(self, graceful: bool) -> None:
        self._farm_stops = True  # not a retirement: the listeners' queues are ours to take
        if graceful and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)  # retiring, now told to stop: drain at once
            return
        if self._stopping and graceful:
            return
        self._stopping = True
        self.gate.stop()
        self.loop.create_task(self._stop(graceful))

    async def _stop(self, graceful: bool) -> None:
        # In a graceful stop of the farm, take what is queued before closing the listeners.
        # A retiring worker does not: the supervisor and the new generation go on serving.
        timeout = self.config.graceful_timeout
        deadline = self.loop.time() + timeout  # the supervisor's SIGKILL comes soon after
        setup = min(timeout / 2, QUEUED_SETUP_TIMEOUT)  # a TLS handshake must not eat the drain
        taken = await self.gate.close(graceful and self._farm_stops, setup)
        if taken:
            log.info("worker %d: took %d queued connection(s) on stopping", self.spec.slot, taken)
        if graceful:
            await self._drain(max(0.0, deadline - self.loop.time()))
        else:
            for protocol in self.sessions.active:
                protocol.abort()
        if not self._done.done():
            self._done.set_result(0)

    async def _drain(self, timeout: float) -> None:
        """Drain within ``timeout``; sessions that have not begun a transaction go last.

        Sessions in a transaction finish it, then get 421; those that had one and are idle
        get 421 at once. A session that has not begun one yet was most likely opened just now
        (maybe by a load balancer that had not yet seen us stop, or taken from the listen
        queue): it gets :data:`UNBEGUN_GRACE` s to begin its transaction (which then
        finishes) or to leave, so that its first MAIL is not refused; then it is drained too.
        """
        deadline = self.loop.time() + timeout
        sessions = self.sessions.active
        unbegun = [p for p in sessions if _unbegun(p)]
        for protocol in sessions:
            if protocol not in unbegun:
                protocol.begin_shutdown()
        if unbegun:
            waiters = [asyncio.ensure_future(p.wait_closed()) for p in unbegun]
            _, pending = await asyncio.wait(waiters, timeout=min(UNBEGUN_GRACE, timeout / 2))
            for waiter in pending:
                waiter.cancel()
        await self.sessions.drain(max(0.0, deadline - self.loop.time()))

    def _reopen_logs(self) -> None:
        if self.config.log_file and reopen_log_file(self.config.log_file):
            log.info("worker %d: log file reopened", self.spec.slot)

    # -- the channel -----------------------------------------------------------------------

    def _send(self, message: ToSupervisor) -> None:
        self._send_many([message])

    def _send_many(self, messages: list[ToSupervisor]) -> None:
        try:
            self.channel.send_many(messages)
        except ChannelClosed:
            self._supervisor_gone()
            return
        if self.channel.pending_output and not self._flushing:
            self._flushing = True
            self.loop.add_writer(self.channel.fileno(), self._flush_channel)

    def _flush_channel(self) -> None:
        """Write what the channel could not take at once (the socket buffer was full)."""
        gone = False
        try:
            self.channel.flush()
        except ChannelClosed:
            gone = True
        if gone or not self.channel.pending_output:
            self._flushing = False
            self.loop.remove_writer(self.channel.fileno())
        if gone:
            self._supervisor_gone()

    def _on_channel(self) -> None:
        try:
            messages = self.channel.receive()
        except ChannelClosed:
            self._supervisor_gone()
            return
        for message in messages:
            match message:
                case MetricsRequest():
                    self._send(Metrics(message.request, self.exposition()))
                case _:
                    log.warning(
                        "worker %d: the supervisor sent a %s: ignored", self.spec.slot, message.kind
                    )

    def exposition(self) -> str:
        """This worker's metrics in the Prometheus text format."""
        self.stats.draining = sum(1 for p in self.sessions.active if p._state.draining)
        return generate_latest(self._registry).decode()

    def send_final_metrics(self) -> None:
        """On the way out: the last totals, so the supervisor's counters lose nothing."""
        with contextlib.suppress(ChannelClosed, OSError):
            self.channel.send(Metrics(None, self.exposition()))
            self.channel.sock.setblocking(True)
            self.channel.sock.settimeout(1.0)
            self.channel.flush()

    def _supervisor_gone(self) -> None:
        self.loop.remove_reader(self.channel.fileno())
        if not self._stopping:
            log.warning("worker %d: the supervisor is gone; draining", self.spec.slot)
            self.stop(True)

    def _heartbeat(self) -> None:
        now = self.loop.time()
        lag = max(0.0, now - self._beat_due)
        self.stats.loop_lag = lag
        self._send(Heartbeat(round(lag, 6), self.active, self.messages))
        self._beat_due = now + HEARTBEAT_INTERVAL
        self.loop.call_at(self._beat_due, self._heartbeat)
