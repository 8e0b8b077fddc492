"""The supervisor: forks workers over pre-bound listeners and keeps them healthy.

One thread, one ``selectors`` loop. Signal handlers only record the signal; the loop reaps,
respawns (with per-slot exponential backoff), detects hung workers, reloads generations and
stops. Workers live in slots 0..N-1; a replacement inherits its slot.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import selectors
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from farm import __version__
from farm.config import Config, ConfigError, load_config
from farm.logs import reopen_log_file
from farm.metrics import SupervisorMetrics
from farm.pipeline import prepare_shared_state
from farm.supervisor.anvil import AnvilTable
from farm.supervisor.channel import Channel, ChannelClosed
from farm.supervisor.listeners import Listener, ListenerError, bind_listeners
from farm.supervisor.messages import Heartbeat, Metrics, MetricsRequest, Ready, Recycle
from farm.supervisor.metrics_http import MetricsHTTPServer
from farm.supervisor.scrape import WorkerMetrics, listener_families
from farm.supervisor.systemd import Notifier
from farm.supervisor.worker import EXIT_BOOT_ERROR, SUPERVISOR_SIGNALS, WorkerSpec, run_worker

log = logging.getLogger("farm.supervisor")

#: A worker that dies within this many seconds of READY counts as dying young (backoff grows).
YOUNG_DEATH = 5.0
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
#: Time a hung worker gets to write its stack dump before SIGKILL.
DUMP_GRACE = 1.0
FAST_STOP_GRACE = 5.0
MEMORY_CHECK_INTERVAL = 5.0
#: Seconds a scrape waits for the workers' answers (a hung worker delays it no longer).
SCRAPE_TIMEOUT = 1.0
#: Seconds past ``graceful_timeout`` a retiring worker gets before SIGKILL.
RETIRE_SLACK = 15.0
#: Seconds past the stop's grace before SIGKILL, so a worker's own drain deadline comes first.
STOP_SLACK = 3.0


#: How often the supervisor reaps, checks health and deadlines when nothing signals it.
TICK_INTERVAL = 0.1
#: ``Arbiter(tls_context=...)`` not given: build it from the configuration.
_FROM_CONFIG = object()


@dataclass
class WorkerProcess:
    """The supervisor's view of one worker process."""

    pid: int
    slot: int
    generation: int
    channel: Channel
    started: float
    ready_at: float | None = None
    last_beat: float = 0.0
    sessions: int = 0
    messages: int = 0
    lag: float = 0.0
    #: Why we asked it to exit (None: any exit is a crash).
    retiring: str | None = None
    kill_at: float | None = None
    timed_out: bool = False
    #: For a recycling replacement: the pid it replaces once READY.
    replaces: int | None = None
    retire_deadline: float | None = None
    #: SIGKILL was sent: nothing more to check, only to reap.
    killed: bool = False

    @property
    def ready(self) -> bool:
        return self.ready_at is not None


@dataclass
class Reload:
    """A reload in progress: the new generation boots beside the old one."""

    generation: int
    old_config: Config
    #: The TLS context of ``old_config`` (loaded by the supervisor, see ``Arbiter``).
    old_tls_context: ssl.SSLContext | None = None
    new_slots: dict[int, int] = field(default_factory=dict)
    deadline: float = 0.0
    opened_listeners: list[Listener] = field(default_factory=list)
    closing_listeners: list[Listener] = field(default_factory=list)


class Arbiter:
    """Runs the farm until it is stopped; ``run()`` returns the exit status.

    The supervisor keeps the identity it was started with (root when ``user`` is set, as
    Postfix's master and nginx's do): it binds new listeners and loads the TLS key, with the
    same rights at every reload. Workers drop to ``user``/``group`` right after the fork and
    get the SSL context built here (``tls_context``: built from ``config`` when not given).
    """

    def __init__(
        self,
        config: Config,
        listeners: list[Listener],
        *,
        overrides: dict[str, Any] | None = None,
        notifier: Notifier | None = None,
        tls_context: ssl.SSLContext | object | None = _FROM_CONFIG,
    ) -> None:
        self.config = config
        self.tls_context = config.smtp.tls_context() if tls_context is _FROM_CONFIG else tls_context
        self.overrides = dict(overrides or {})
        self.listeners = {listener.address: listener for listener in listeners}
        self.notifier = notifier or Notifier()
        self.metrics = SupervisorMetrics()
        self.metrics.build.info({"version": __version__})
        self.workers: dict[int, WorkerProcess] = {}
        self.slots: dict[int, int] = {}
        self.desired = config.workers
        self.generation = 1
        self.failures: collections.Counter[int] = collections.Counter()
        self.spawn_at: dict[int, float] = {}
        self.state = "booting"
        self.reload: Reload | None = None
        self.exit_code: int | None = None
        self.stop_deadline: float | None = None
        #: While SIGTERM's ``stop_delay`` runs: when the graceful stop begins (None otherwise).
        self.lame_duck_until: float | None = None
        self._stop_notified = False
        self._signals: collections.deque[int] = collections.deque()
        self._selector = selectors.DefaultSelector()
        self._wakeup_r, self._wakeup_w = os.pipe()
        self._metrics_server: MetricsHTTPServer | None = None
        self._next_watchdog = 0.0
        self._boot_deadline = 0.0
        self._next_memory_check = 0.0
        self.worker_metrics = WorkerMetrics()
        self._scrape_waiters: list[Callable[[CollectorRegistry], None]] = []
        self._scrape_pending: set[int] | None = None
        self._scrape_deadline = 0.0
        self._scrape_id = 0
        #: Per-client-IP counters, shared with every worker (mapped before the first fork).
        self.anvil = AnvilTable()

    # -- setup and the loop ----------------------------------------------------------------

    def run(self) -> int:
        """Boot the workers and supervise them until stopped."""
        self._install_signals()
        self._set_title()
        if self.config.metrics:
            self._metrics_server = MetricsHTTPServer(
                self.config.metrics, self._selector, self._begin_scrape, self.readiness
            )
            log.info("metrics on http://%s/metrics", self._metrics_server.address)
        self.metrics.reload_generation.set(self.generation)
        self._boot_deadline = time.monotonic() + self.config.boot_timeout
        for slot in range(self.desired):
            self.slots[slot] = self._spawn(slot, self.generation)
        try:
            next_tick = 0.0
            while self.exit_code is None:
                for key, _ in self._selector.select(self._select_timeout()):
                    key.data()
                signalled = bool(self._signals)
                self._handle_signals()
                now = time.monotonic()
                # Channel traffic may wake the loop often: the periodic work
                # runs on signals and every TICK_INTERVAL, not on every wake-up.
                if signalled or now >= next_tick:
                    self._reap()
                    self._tick()
                    next_tick = now + TICK_INTERVAL
        finally:
            self._cleanup()
        return self.exit_code

    def _install_signals(self) -> None:
        os.set_blocking(self._wakeup_w, False)
        os.set_blocking(self._wakeup_r, False)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in SUPERVISOR_SIGNALS:
            signal.signal(signum, self._record_signal)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, self._drain_wakeup)

    def _record_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)  # only record: the loop does the work

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wakeup_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _select_timeout(self) -> float:
        return 0.0 if self._signals else 0.25

    def _set_title(self) -> None:
        try:
            from setproctitle import setproctitle
        except ImportError:  # pragma: no cover
            return
        source = self.config.source or "defaults"
        setproctitle(f"farm: supervisor [{source}]")

    def _cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum in SUPERVISOR_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        if self._metrics_server is not None:
            self._metrics_server.close()
        for listener in self.listeners.values():
            listener.close()
        self._selector.close()
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)

    # -- spawning --------------------------------------------------------------------------

    def _spawn(
        self,
        slot: int,
        generation: int,
        replaces: int | None = None,
        config: Config | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> int:
        """Fork a worker for ``slot`` serving ``config`` (default: the running one, with its
        TLS context); its pid. OSError when the fork fails (nothing is left behind)."""
        if config is None:
            config, tls_context = self.config, self.tls_context
        prepare_shared_state(config)  # inherited by the worker at fork
        supervisor_end, worker_end = Channel.pair()
        close_fds = [supervisor_end.fileno(), self._wakeup_r, self._wakeup_w]
        close_fds += [w.channel.fileno() for w in self.workers.values()]
        close_fds += self._selector_fds()
        if self._metrics_server is not None:
            close_fds += self._metrics_server.fds()
        if self.reload is not None:
            # Listeners the reload removed stay open here until it commits; a worker must
            # not keep a copy, or the port would go on accepting with nobody to greet.
            close_fds += [listener.fileno() for listener in self.reload.closing_listeners]
        sys.stdout.flush()
        sys.stderr.flush()
        # Signals stay blocked in the child until its own handlers are in place (the worker
        # unblocks them): none is lost, and none kills it with a default action meanwhile.
        region = self.anvil.new_region()  # the sessions it holds, seen by us after its death
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            supervisor_end.close()
            worker_end.close()
            region.close()
            raise
        if pid == 0:
            spec = WorkerSpec(
                slot=slot,
                generation=generation,
                config=config,
                listeners=list(self.listeners.values()),
                channel=worker_end,
                close_fds=close_fds,
                tls_context=tls_context,
                anvil=self.anvil,
                anvil_region=region,
            )
            run_worker(spec)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        self.anvil.adopt(pid, region)
        worker_end.close()
        now = time.monotonic()
        worker = WorkerProcess(
            pid=pid,
            slot=slot,
            generation=generation,
            channel=supervisor_end,
            started=now,
            last_beat=now,
            replaces=replaces,
        )
        self.workers[pid] = worker
        self._selector.register(
            supervisor_end.fileno(), selectors.EVENT_READ, lambda: self._on_channel(worker)
        )
        # Series exist from the start, so that increase() sees their first change.
        self.metrics.backoff.labels(str(slot))
        self.metrics.scrape_errors.labels(str(slot))
        log.info("worker %d gen %d started (pid %d)", slot, generation, pid)
        return pid

    def _selector_fds(self) -> list[int]:
        fileno = getattr(self._selector, "fileno", None)
        return [fileno()] if callable(fileno) else []

    # -- worker messages -------------------------------------------------------------------

    def _on_channel(self, worker: WorkerProcess) -> None:
        try:
            messages = worker.channel.receive()
        except ChannelClosed:
            self._forget_channel(worker)
            return
        now = time.monotonic()
        for message in messages:
            match message:
                case Heartbeat():
                    worker.last_beat = now
                    worker.lag = message.lag
                    worker.sessions = message.sessions
                    worker.messages = message.messages
                case Ready():
                    worker.ready_at = worker.last_beat = now
                    log.info(
                        "worker %d gen %d ready (pid %d)",
                        worker.slot,
                        worker.generation,
                        worker.pid,
                    )
                    self._on_ready(worker)
                case Recycle():
                    self._recycle(worker, message.reason)
                case Metrics():
                    self._on_metrics(worker, message)
                case _:
                    log.warning(
                        "worker %d (pid %d) sent a %s: ignored",
                        worker.slot,
                        worker.pid,
                        message.kind,
                    )

    def _read_final_metrics(self, worker: WorkerProcess) -> None:
        """A reaped worker's last words: only its final metrics still matter."""
        with contextlib.suppress(ChannelClosed, OSError):
            for message in worker.channel.receive():
                if isinstance(message, Metrics):
                    self.worker_metrics.record(worker.pid, worker.slot, message.text)

    def _forget_channel(self, worker: WorkerProcess) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.channel.fileno())
        worker.channel.close()

    def _on_ready(self, worker: WorkerProcess) -> None:
        if worker.replaces is not None:
            old = self.workers.get(worker.replaces)
            if self.slots.get(worker.slot) != worker.replaces:
                # Its slot changed hands meanwhile (reload, scale-down): it is not needed.
                worker.replaces = None
                self._retire(worker, "recycle")
                return
            self.slots[worker.slot] = worker.pid
            if old is not None:
                self._retire(old, "recycle")
            worker.replaces = None
        if self.state == "booting" and self._ready_count() >= self.desired:
            self.state = "running"
            log.info("farm ready: %d workers on %s", self.desired, ", ".join(self.listeners))
            self.notifier.ready(f"serving with {self.desired} workers")
        if self.reload is not None and self.state == "running" and self._reload_complete():
            self._commit_reload()

    def _ready_count(self) -> int:
        return sum(
            1 for pid in self.slots.values() if pid in self.workers and self.workers[pid].ready
        )

    def _recycle(self, worker: WorkerProcess, reason: str) -> None:
        if self.state != "running" or worker.retiring or self.slots.get(worker.slot) != worker.pid:
            return
        if any(w.replaces == worker.pid for w in self.workers.values()):
            return
        log.info("worker %d (pid %d) asks to be recycled: %s", worker.slot, worker.pid, reason)
        try:
            self._spawn(worker.slot, worker.generation, replaces=worker.pid)
        except OSError as error:
            log.error("cannot start a replacement for worker %d: %s", worker.slot, error)
            return
        self.metrics.restarts.labels("recycle").inc()

    def _retire(self, worker: WorkerProcess, reason: str, graceful: bool = True) -> None:
        """Ask a worker to exit.

        For a stop, graceful is SIGTERM (finish transactions, 421 to idle sessions). For a
        reload, recycle or scale-down it is SIGHUP: stop accepting and let every session end
        by itself (as Postfix's smtpd does on reload), 421 only at ``graceful_timeout``.
        Otherwise SIGQUIT: abort the sessions.
        """
        if worker.retiring is None or reason == "stop":
            worker.retiring = reason
            # A stop drains for graceful_timeout; a retirement first lets sessions end by
            # themselves for graceful_timeout, then drains for as long again.
            drains = 1 if reason == "stop" else 2
            worker.retire_deadline = (
                time.monotonic() + drains * self.config.graceful_timeout + RETIRE_SLACK
            )
        if not graceful:
            signum = signal.SIGQUIT
        else:
            signum = signal.SIGTERM if reason == "stop" else signal.SIGHUP
        self._kill(worker.pid, signum)

    def _kill(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    # -- signals ---------------------------------------------------------------------------

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.popleft()
            if signum == signal.SIGCHLD:
                continue  # reaping happens every turn of the loop
            name = signal.Signals(signum).name
            if signum != signal.SIGCHLD:
                log.info("received %s", name)
            if signum == signal.SIGTERM:
                self._begin_stop(graceful=True)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self._begin_stop(graceful=False)
            elif signum == signal.SIGHUP:
                self._begin_reload()
            elif signum == signal.SIGTTIN:
                self._scale(+1)
            elif signum == signal.SIGTTOU:
                self._scale(-1)
            elif signum == signal.SIGUSR1:
                self._reopen_logs()

    def _reopen_logs(self) -> None:
        if self.config.log_file and reopen_log_file(self.config.log_file):
            log.info("log file reopened")
        for pid in self.workers:
            self._kill(pid, signal.SIGUSR1)

    def _scale(self, delta: int) -> None:
        if self.state not in ("running", "booting") or self.reload is not None:
            log.warning("not scaling while %s", "reloading" if self.reload else self.state)
            return
        if delta > 0:
            slot = self.desired
            try:
                self.slots[slot] = self._spawn(slot, self.generation)
            except OSError as error:  # EAGAIN (process limit), ENOMEM: refuse the scale-up
                log.error(
                    "cannot start worker %d: %s; workers desired: %d", slot, error, self.desired
                )
                return
            self.desired += 1
        elif self.desired > 1:
            self.desired -= 1
            slot = self.desired
            self.spawn_at.pop(slot, None)
            self.failures.pop(slot, None)
            pid = self.slots.pop(slot, None)
            for worker in list(self.workers.values()):
                if worker.pid == pid or (worker.slot == slot and worker.replaces is not None):
                    self._retire(worker, "scale")
        log.info("workers desired: %d", self.desired)

    # -- stopping --------------------------------------------------------------------------

    def readiness(self) -> str:
        """What ``/ready`` says: ``ready`` while serving, else why not (answered 503)."""
        if self.state == "stopping" or self.lame_duck_until is not None:
            return "stopping"
        if self.state != "running":
            return self.state
        return "ready" if self._ready_count() else "no worker ready"

    def _begin_lame_duck(self) -> None:
        """SIGTERM with ``stop_delay``: /ready turns 503 at once, the drain starts later.

        Meanwhile the farm serves as usual, so that a load balancer's health check takes it out
        of rotation before it stops accepting.
        """
        delay = self.config.stop_delay
        self.lame_duck_until = time.monotonic() + delay
        self._notify_stopping()
        self.notifier.extend_timeout(delay + self.config.graceful_timeout + 2 * STOP_SLACK)
        log.info("stopping in %gs: /ready says 503, still serving meanwhile", delay)

    def _notify_stopping(self) -> None:
        if not self._stop_notified:
            self._stop_notified = True
            self.notifier.stopping()

    def _begin_stop(self, graceful: bool) -> None:
        if self.state == "stopping" and graceful:
            return
        lame_duck = graceful and self.state == "running" and self.config.stop_delay > 0
        if lame_duck and self.lame_duck_until is None:
            self._begin_lame_duck()
            return  # a second SIGTERM (or the delay's end) comes back here
        self.lame_duck_until = None
        self.state = "stopping"
        if self.reload is not None:
            log.info("stop: the reload to generation %d is abandoned", self.reload.generation)
            self.reload = None
        self._notify_stopping()
        now = time.monotonic()
        grace = self.config.graceful_timeout if graceful else FAST_STOP_GRACE
        deadline = now + grace + STOP_SLACK  # the workers' own drain ends first
        self.stop_deadline = (
            deadline if self.stop_deadline is None else min(self.stop_deadline, deadline)
        )
        # The metrics listener stays open: /ready says 503 to the end, /metrics shows the drain.
        for worker in list(self.workers.values()):
            self._retire(worker, "stop", graceful=graceful)
        self._close_listeners()
        log.info(
            "%s stop: %d worker(s), deadline %.0fs",
            "graceful" if graceful else "fast",
            len(self.workers),
            grace,
        )

    def _close_listeners(self) -> None:
        """Close the supervisor's copies of the listening sockets (it never accepts on them).

        The workers, told to stop just now, still hold theirs: each takes the connections
        already queued before closing its copy, and once the last copy is closed new
        connections are refused (a load balancer then retries elsewhere) instead of queueing
        where nobody accepts them any more, to be reset at exit.
        """
        listeners, self.listeners = list(self.listeners.values()), {}
        for listener in listeners:
            listener.close()

    # -- reload ----------------------------------------------------------------------------

    def _begin_reload(self) -> None:
        if self.state != "running":
            log.warning("reload ignored while %s", self.state)
            return
        if self.reload is not None:
            log.warning("reload ignored: a reload is already in progress")
            return
        self.metrics.reload_last_timestamp.set(time.time())
        try:
            new_config = load_config(self.config.source, self.overrides)
            tls_context = new_config.smtp.tls_context()  # keys read with the supervisor's rights
        except ConfigError as error:
            log.error("reload failed: %s; keeping the running configuration", error)
            self.metrics.reload_last_success.set(0)
            return
        try:
            opened, closing = self._apply_listeners(new_config)
        except ListenerError as error:
            log.error("reload failed: %s; keeping the running configuration", error)
            self.metrics.reload_last_success.set(0)
            return
        self.notifier.reloading()
        generation = self.generation + 1
        reload = Reload(
            generation=generation, old_config=self.config, old_tls_context=self.tls_context
        )
        reload.deadline = time.monotonic() + new_config.boot_timeout
        reload.opened_listeners = opened
        reload.closing_listeners = closing
        self.reload = reload
        self.config = new_config
        self.tls_context = tls_context
        for listener in opened:
            self.listeners[listener.address] = listener
        for listener in closing:
            self.listeners.pop(listener.address, None)
        self._set_title()
        log.info(
            "reloading: starting generation %d with %d workers", generation, new_config.workers
        )
        try:
            for slot in range(new_config.workers):
                reload.new_slots[slot] = self._spawn(slot, generation)
        except OSError as error:
            self._abort_reload(f"cannot start the new workers: {error}")

    def _apply_listeners(self, new_config: Config) -> tuple[list[Listener], list[Listener]]:
        """Bind the addresses new in ``new_config``; list those it no longer has."""
        wanted = [a.text for a in new_config.listen_addresses()]
        if set(wanted) == set(self.listeners) or self._inherited():
            return [], []
        new = [a for a in new_config.listen_addresses() if a.text not in self.listeners]
        opened = bind_listeners(new) if new else []
        closing = [ls for address, ls in self.listeners.items() if address not in wanted]
        return opened, closing

    def _inherited(self) -> bool:
        return any(listener.from_systemd for listener in self.listeners.values())

    def _reload_complete(self) -> bool:
        assert self.reload is not None
        return all(
            pid in self.workers and self.workers[pid].ready
            for pid in self.reload.new_slots.values()
        )

    def _commit_reload(self) -> None:
        reload = self.reload
        assert reload is not None
        new_pids = set(reload.new_slots.values())
        # Every other worker goes, recycling replacements still booting included.
        old = [w for w in self.workers.values() if w.pid not in new_pids and w.retiring is None]
        self.slots = dict(reload.new_slots)
        self.desired = len(self.slots)
        self.generation = reload.generation
        self.spawn_at.clear()
        self.failures.clear()
        for worker in old:
            self._retire(worker, "reload")
            self.metrics.restarts.labels("reload").inc()
        for listener in reload.closing_listeners:
            listener.close()
        self.reload = None
        self.metrics.reload_generation.set(self.generation)
        self.metrics.reload_last_success.set(1)
        log.info(
            "reload complete: generation %d serving, draining %d old worker(s)",
            self.generation,
            len(old),
        )
        self.notifier.ready(f"serving with {self.desired} workers, generation {self.generation}")

    def _abort_reload(self, why: str) -> None:
        reload = self.reload
        assert reload is not None
        log.error("reload failed: %s; generation %d keeps serving", why, self.generation)
        for pid in reload.new_slots.values():
            if pid in self.workers:
                self._retire(self.workers[pid], "reload-aborted", graceful=False)
                self._kill(pid, signal.SIGKILL)
        for listener in reload.opened_listeners:
            self.listeners.pop(listener.address, None)
            listener.close()
        for listener in reload.closing_listeners:
            self.listeners[listener.address] = listener
        self.config = reload.old_config
        self.tls_context = reload.old_tls_context
        self.reload = None
        self.metrics.reload_last_success.set(0)
        self._set_title()
        self.notifier.ready(f"serving with {self.desired} workers (reload failed)")

    # -- reaping ---------------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except OSError as error:
                if error.errno == errno.EINTR:
                    continue
                raise
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._read_final_metrics(worker)
                self._forget_channel(worker)
                self.anvil.worker_gone(pid)
                self.worker_metrics.exited(pid)
                if self._scrape_pending is not None and pid in self._scrape_pending:
                    self._scrape_pending.discard(pid)
                    if not self._scrape_pending:
                        self._finish_scrape()
                self._on_exit(worker, status)

    def _on_exit(self, worker: WorkerProcess, status: int) -> None:
        how = _describe_status(status)
        if worker.retiring is not None:
            log.info(
                "worker %d gen %d (pid %d) exited (%s): %s",
                worker.slot,
                worker.generation,
                worker.pid,
                worker.retiring,
                how,
            )
            return
        if self.state == "stopping":
            return
        reason = "timeout" if worker.timed_out else "crash"
        if self.reload is not None and worker.pid in self.reload.new_slots.values():
            self._abort_reload(f"new worker {worker.slot} (pid {worker.pid}) {how} before READY")
            return
        if worker.replaces is not None:
            log.error(
                "recycling replacement for worker %d %s before READY; keeping the old one",
                worker.slot,
                how,
            )
            return
        if self.state == "booting" and not worker.ready:
            code = os.waitstatus_to_exitcode(status)
            hint = " (the handler could not be loaded)" if code == EXIT_BOOT_ERROR else ""
            message = (
                f"worker {worker.slot} (pid {worker.pid}) {how} before it was ready{hint}; stopping"
            )
            log.error(message)
            print(f"farm: {message}", file=sys.stderr, flush=True)
            self.exit_code = 1
            self._begin_stop(graceful=False)
            return
        if self.slots.get(worker.slot) != worker.pid:
            return
        self.metrics.restarts.labels(reason).inc()
        now = time.monotonic()
        young = not worker.ready or now - (worker.ready_at or now) < YOUNG_DEATH
        if young:
            self.failures[worker.slot] += 1
            delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** (self.failures[worker.slot] - 1))
        else:
            self.failures.pop(worker.slot, None)
            delay = 0.0
        log.error(
            "worker %d gen %d (pid %d) %s (%s); respawning in %.0fs",
            worker.slot,
            worker.generation,
            worker.pid,
            how,
            reason,
            delay,
        )
        self.slots.pop(worker.slot, None)
        self.spawn_at[worker.slot] = now + delay
        self.metrics.backoff.labels(str(worker.slot)).set(delay)

    # -- periodic work ---------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.channel.pending_output:
                with contextlib.suppress(ChannelClosed, OSError):
                    worker.channel.flush()
        if self._metrics_server is not None:
            self._metrics_server.expire(now)
        if self._scrape_pending is not None and now > self._scrape_deadline:
            self._finish_scrape()
        if self.state == "stopping":
            self._tick_stopping(now)
            return
        if self.lame_duck_until is not None and now >= self.lame_duck_until:
            self._begin_stop(graceful=True)
            return
        for slot, when in list(self.spawn_at.items()):
            if when <= now and slot < self.desired and slot not in self.slots:
                del self.spawn_at[slot]
                self.metrics.backoff.labels(str(slot)).set(0)
                serving, context = (
                    (self.reload.old_config, self.reload.old_tls_context)
                    if self.reload is not None
                    else (self.config, self.tls_context)
                )
                try:
                    self.slots[slot] = self._spawn(
                        slot, self.generation, config=serving, tls_context=context
                    )
                except OSError as error:
                    log.error("cannot start worker %d: %s; retrying in 5s", slot, error)
                    self.spawn_at[slot] = now + 5.0
        for worker in list(self.workers.values()):
            self._check_health(worker, now)
        if self.state == "booting" and now > self._boot_deadline:
            message = f"no READY from every worker within {self.config.boot_timeout:.0f}s; stopping"
            log.error(message)
            print(f"farm: {message}", file=sys.stderr, flush=True)
            self.exit_code = 1
            self._begin_stop(graceful=False)
            return
        if self.reload is not None and now > self.reload.deadline:
            self._abort_reload(
                f"the new workers were not READY within {self.config.boot_timeout:.0f}s"
            )
        self._check_memory(now)
        self._watchdog(now)

    def _check_health(self, worker: WorkerProcess, now: float) -> None:
        if worker.killed:
            return
        if worker.kill_at is not None:
            if now >= worker.kill_at:
                self._sigkill(worker)
            return
        if worker.retiring is not None:
            if worker.retire_deadline is not None and now > worker.retire_deadline:
                log.warning(
                    "worker %d (pid %d) still draining after %.0fs: SIGKILL",
                    worker.slot,
                    worker.pid,
                    self.config.graceful_timeout + RETIRE_SLACK,
                )
                self._sigkill(worker)
            return
        if not worker.ready:
            if now - worker.started > self.config.boot_timeout:
                log.error(
                    "worker %d (pid %d) not READY after %.0fs: killing it",
                    worker.slot,
                    worker.pid,
                    self.config.boot_timeout,
                )
                worker.timed_out = True
                self._sigkill(worker)
            return
        silent = now - worker.last_beat
        if silent > self.config.timeout:
            log.error(
                "worker %d gen %d (pid %d) sent no heartbeat for %.1fs: "
                "dumping its stack, then killing it",
                worker.slot,
                worker.generation,
                worker.pid,
                silent,
            )
            worker.timed_out = True
            self._kill(worker.pid, signal.SIGUSR2)
            worker.kill_at = now + DUMP_GRACE

    def _sigkill(self, worker: WorkerProcess) -> None:
        worker.kill_at = None
        worker.killed = True
        self._kill(worker.pid, signal.SIGKILL)

    def _check_memory(self, now: float) -> None:
        """Recycle serving workers whose RSS passed ``max_rss`` MiB (checked every few s)."""
        if not self.config.max_rss or now < self._next_memory_check:
            return
        self._next_memory_check = now + MEMORY_CHECK_INTERVAL
        limit = self.config.max_rss * 1024 * 1024
        for pid in list(self.slots.values()):
            worker = self.workers.get(pid)
            if worker is None or not worker.ready or worker.retiring:
                continue
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                self._recycle(worker, f"max_rss: {rss // (1024 * 1024)} MiB")

    def _tick_stopping(self, now: float) -> None:
        if not self.workers:
            if self.exit_code is None:
                self.exit_code = 0
            log.info("stopped")
            return
        if self.stop_deadline is not None and now >= self.stop_deadline:
            log.warning("%d worker(s) still running at the deadline: SIGKILL", len(self.workers))
            for pid in list(self.workers):
                self._kill(pid, signal.SIGKILL)
            self.stop_deadline = None

    def _watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if not interval or now < self._next_watchdog:
            return
        if self.state == "running" and self._ready_count() > 0:
            self.notifier.watchdog()
            self._next_watchdog = now + interval

    # -- metrics ---------------------------------------------------------------------------

    def _begin_scrape(self, done: Callable[[CollectorRegistry], None]) -> None:
        """Ask every live worker for its metrics; ``done`` gets the registry (bounded wait)."""
        self._scrape_waiters.append(done)
        if self._scrape_pending is not None:
            return  # a scrape is under way: this one shares its answers
        self._scrape_id += 1
        pending = set()
        for worker in self.workers.values():
            if not worker.ready or worker.killed or worker.channel.sock.fileno() < 0:
                continue  # a worker still booting has nothing to say yet
            try:
                worker.channel.send(MetricsRequest(self._scrape_id))
            except ChannelClosed:
                continue
            pending.add(worker.pid)
        self._scrape_pending = pending
        self._scrape_deadline = time.monotonic() + SCRAPE_TIMEOUT
        if not pending:
            self._finish_scrape()

    def _on_metrics(self, worker: WorkerProcess, message: Metrics) -> None:
        self.worker_metrics.record(worker.pid, worker.slot, message.text)
        pending = self._scrape_pending
        if pending is not None and message.request == self._scrape_id:
            pending.discard(worker.pid)
            if not pending:
                self._finish_scrape()

    def _finish_scrape(self) -> None:
        for pid in self._scrape_pending or ():
            worker = self.workers.get(pid)
            if worker is not None:
                self.metrics.scrape_errors.labels(str(worker.slot)).inc()
                log.warning(
                    "worker %d (pid %d) did not answer the scrape in time", worker.slot, pid
                )
        self._scrape_pending = None
        self.metrics.workers_desired.set(self.desired)
        self.metrics.workers_ready.set(self._ready_count())
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(self._collect_families()))
        waiters, self._scrape_waiters = self._scrape_waiters, []
        for done in waiters:
            done(registry)

    def _collect_families(self) -> list[Metric]:
        live = {pid: w.slot for pid, w in self.workers.items()}  # until reaped
        families = list(self.metrics.registry.collect())
        families += self.worker_metrics.families(live)
        families += listener_families(
            (listener.name, listener.socket) for listener in self.listeners.values()
        )
        return families


class _Snapshot:
    """A collector that returns metric families gathered once, for one scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
