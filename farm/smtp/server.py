"""``SMTP``: the asyncio protocol that runs one client session through the handler's hooks.

Input is framed by the sans-I/O :class:`~farm.smtp.framing.Framer`; commands are handled in
order, one at a time. A command whose handler hook exists runs in a task; every other command
completes synchronously inside ``data_received`` (no task, no await), and the replies of one
batch of pipelined commands leave in a single write.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import itertools
import logging
import os
import socket
import ssl
import threading
import warnings
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from types import CoroutineType
from typing import TYPE_CHECKING, Any, TypeVar

from farm.smtp.arguments import CONTROL_CHARACTERS, parse_path, split_command
from farm.smtp.auth import AuthResult, LoginPassword
from farm.smtp.body import (
    CHUNK_SIZE,
    INSUFFICIENT_STORAGE,
    Body,
    BodyMemoryExceeded,
    MemoryBudget,
)
from farm.smtp.chunking import (
    BDAT_SYNTAX,
    chunk_accepted,
    chunk_refusal,
    chunk_size_to_skip,
    parse_bdat,
)
from farm.smtp.deadlines import (
    Expired,
    extended_data_deadline,
    next_deadline,
    timer_on_write_pause,
)
from farm.smtp.error_limits import JUNK_COMMANDS, ErrorLimits, any_limit
from farm.smtp.framing import BodyPart, Chunk, Command, DataError, Framer, Message
from farm.smtp.help import offered, syntax, syntax_text
from farm.smtp.hooks import MISSING as MISSING  # re-exported by farm.smtp
from farm.smtp.hooks import HookTable, hook_table
from farm.smtp.limiter import (
    ClientLimiter,
    too_many_auth_failures,
    too_many_connections,
    too_much_mail,
)
from farm.smtp.logline import MessageLine, SessionLine, log_fields
from farm.smtp.logline import peer_text as _peer_text
from farm.smtp.mail_rcpt import parse_mail, parse_rcpt, utf8_refusal
from farm.smtp.proxy import parse_networks, peer_trusted
from farm.smtp.proxy_header import ProxyData, ProxyParser
from farm.smtp.replies import format_multiline, with_enhanced_code
from farm.smtp.sasl import (
    AUTH_FAILED,
    AUTH_OK,
    SASL_LINE_LIMIT,
    TOO_MANY_FAILURES,
    UNRECOGNIZED,
    AuthAborted,
    AuthOutcome,
    auth_outcome,
    check_credentials,
    count_failure,
    login_exchange,
    parse_auth,
    plain_exchange,
    server_mechanisms,
)
from farm.smtp.sasl import challenge as sasl_challenge
from farm.smtp.session import Envelope, Session
from farm.smtp.settings import DEFAULTS
from farm.smtp.stages import Stage, Stages
from farm.smtp.state import (
    DATA_AFTER_BDAT,
    HELO_FIRST,
    SHUTTING_DOWN,
    ConnectionState,
    Phase,
    call_limit_exceeded,
    gate_needed,
    ordering_refusal,
    refusal_before_verb,
    refusal_for_auth,
    too_many_calls,
)
from farm.smtp.synchronization import SYNCHRONIZATION_ERROR, command_verb, sent_too_soon
from farm.smtp.timer_queue import TimerQueue
from farm.smtp.tls import (
    HANDSHAKE_ERRORS,
    failure_reason,
    forget_before_tls,
    setup_exception,
    starttls_refusal,
    tls_session_info,
)
from farm.smtp.version import __version__
from farm.smtp.write_batch import WriteBatch

log = logging.getLogger("farm.smtp")

#: The greeting's default identification, after the host name (``ident=`` replaces it).
__ident__ = f"Python SMTP farm {__version__}"
#: Unknown commands a session may send; the last one is answered 502 and closes.
BOGUS_LIMIT = DEFAULTS.unknown_command_limit
#: Per-command call limit when ``command_call_limit`` is a dict without a ``"*"`` entry.
CALL_LIMIT_DEFAULT = 20
DATA_SIZE_DEFAULT = DEFAULTS.data_size_limit
MAX_RECIPIENTS_DEFAULT = DEFAULTS.max_recipients


LOCAL_ERROR = "451 4.3.0 Requested action aborted: local error"
#: Input kept while a hook runs or the client does not read; reading pauses past it.
_MAX_PENDING_INPUT = 256 * 1024
#: Replies of one pipelined batch written at a time: past them, the write buffer is looked at
#: (a client that pipelines but never reads would otherwise get its whole batch buffered).
_REPLIES_PER_WRITE = 64

#: Seconds a closing connection has to take its last replies before it is aborted.
_CLOSE_GRACE = 3.0
_READ_BUFFER_SIZE = 64 * 1024
_has_control_characters = CONTROL_CHARACTERS.search
_read_buffers = threading.local()

_P = TypeVar("_P", bound="SMTP")

_session_ids = itertools.count(1)
_session_prefix = f"{os.getpid():x}"


#: handle_CLOSE tasks still running (a strong reference, so none is collected mid-way).
_close_tasks: set[asyncio.Task[None]] = set()


def _reset_session_ids() -> None:
    """A forked worker numbers its sessions afresh, under its own pid."""
    global _session_ids, _session_prefix
    _session_ids = itertools.count(1)
    _session_prefix = f"{os.getpid():x}"


os.register_at_fork(after_in_child=_reset_session_ids)


@functools.cache
def default_hostname() -> str:
    """The host's FQDN, computed once per process."""
    return socket.getfqdn()


def _hook_verbs(cls: type) -> dict[str, Callable[..., Coroutine[Any, Any, None]]]:
    """``{"MAIL": SMTP.smtp_MAIL, ...}`` for a class, computed once per class."""
    table = cls.__dict__.get("_verb_table_cache")
    if table is None:
        table = {
            name[5:]: getattr(cls, name)
            for name in dir(cls)
            if name.startswith("smtp_") and name[5:].isupper()
        }
        type.__setattr__(cls, "_verb_table_cache", table)  # this class only
    return table


#: What the log says and the reply, when the limiter refuses a MAIL or an AUTH.
_RATE_REFUSALS: dict[str, tuple[str, Callable[[str], str]]] = {
    "messages": ("MAIL refused: too much mail", too_much_mail),
    "auth": ("AUTH refused: too many AUTH failures", too_many_auth_failures),
}


class SMTP(asyncio.BufferedProtocol):
    """One SMTP session per instance; construct one per connection (a protocol factory).

    The engine's own helpers are called through the class, ``SMTP._reply(self, text)``, not
    ``self._reply(text)``: CPython 3.11 cannot specialise a method looked up on an instance
    whose ``__dict__`` holds this many attributes (past its shared-keys limit), so each such
    call pays a full lookup; through the class it is a cached one (the engine's instructions
    per message: 368k -> 349k). Methods a subclass may override (aiosmtpd's ``smtp_*``,
    ``push``, ``_call_handler_hook``, ``_create_session``, ``_create_envelope``,
    ``_set_rset_state``, ``_set_post_data_state``, the asyncio.Protocol methods; LMTP's
    ``_data_replies``) are always called on ``self``.
    """

    command_size_limit = 512
    #: Seconds a client may leave our replies unread (writes paused) before it is dropped; the
    #: idle ``timeout`` applies when shorter.
    write_stall_limit = 60.0
    #: Longest DATA line, in octets before CRLF, not counting a stuffing dot.
    line_length_limit = 1000
    #: Longest local part of an address; 0: no limit (aiosmtpd's default).
    local_part_limit = 0
    # Per-connection state that starts the same for every session: class defaults, set on
    # the instance only once it changes (keeps building a protocol per connection cheap).
    if TYPE_CHECKING:
        # None until connection_made (aiosmtpd's API); no command runs before it sets them.
        session: Session
        envelope: Envelope
        transport: asyncio.Transport
        loop: asyncio.AbstractEventLoop
    else:
        session = None
        envelope = None
        transport = None
        loop = None
    if TYPE_CHECKING:
        #: This thread's read buffer (see :meth:`get_buffer`), once a read asked for it.
        _read_view: memoryview
    else:
        _read_view = None
    #: Called with this protocol when its connection is made (for TLS from the first byte:
    #: once the handshake is done), and once it is lost (the farm's worker uses them).
    on_open: Callable[[SMTP], None] | None = None
    on_close: Callable[[SMTP], None] | None = None
    #: The LOGIN mechanism's prompts (aiosmtpd's texts; a subclass may change them).
    AuthLoginUsernameChallenge = "User Name\x00"
    AuthLoginPasswordChallenge = "Password\x00"
    # The protocol state (phase, counters, clocks, AUTH/STARTTLS/BDAT flags, how the session
    # ends) is ``self._state``, a farm.smtp.state.ConnectionState; here are the I/O handles
    # and the settings derived from the configuration.
    _tls_protocol: Any = None
    _line_waiter: asyncio.Future[Any] | None = None
    _task: asyncio.Task[None] | None = None
    _task_is_delivery = False
    _read_paused = False
    _size_limits: dict[str, int] | None = None
    #: The idle timer: the server's TimerQueue (the first deadline, from the greeting), a
    #: timer of the session's own (later deadlines), or None.
    _timer: asyncio.TimerHandle | TimerQueue | None = None
    _closed_waiter: asyncio.Future[None] | None = None
    #: Whether commands pass the policy gate (farm.smtp.state.gate_needed), kept up to date.
    _checks = False
    _greet_handle: asyncio.TimerHandle | None = None
    #: A :class:`farm.metrics.WorkerStats` the session counts into (the farm's workers set it).
    stats: Any = None
    #: The client's key in the ``limiter`` once it was admitted (None: not limited); the
    #: limiter's session is released with it when the connection is lost.
    _limit_key: str | None = None
    # The bodies being received are resources (memory counted in ``body_budget``, maybe a
    # spool file), closed when the transaction or the connection ends: they stay here.
    #: The DATA body being received (BDAT's is ``_bdat_content``).
    _body: Body | None = None
    #: Content received by earlier BDAT chunks of this transaction (None: no BDAT yet).
    _bdat_content: Body | None = None
    #: The checks around the hooks (farm.smtp.stages); None: there are none.
    _stages: Stages | None = None
    #: The PROXY header being read (None: none expected, or read) and its deadline.
    _proxy_parser: ProxyParser | None = None
    _proxy_timer: asyncio.TimerHandle | None = None
    #: Postfix's error limits (farm.smtp.error_limits); None: all off.
    _error_limits: ErrorLimits | None = None
    #: Replies are held while an error delay runs.
    _held = False
    #: Replies held for the end of the event loop's pass, and the batch that writes them
    #: (one per server built by :meth:`protocol_factory`; None: every reply written at once).
    _deferred: bytes | None = None
    _write_batch: WriteBatch | None = None
    #: The first idle deadlines of a protocol_factory server's sessions (None: a timer each).
    _timer_queue: TimerQueue | None = None

    #: Verbs that always run in a task (they await the client or a TLS handshake).
    _always_task = frozenset({"STARTTLS", "AUTH"})
    #: Hooks each verb may call (a verb with one of them present runs in a task).
    _verb_hooks: dict[str, tuple[str, ...]] = {
        "HELO": ("HELO",),
        "EHLO": ("EHLO",),
        "MAIL": ("MAIL",),
        "RCPT": ("RCPT",),
        "RSET": ("RSET",),
        "NOOP": ("NOOP",),
        "QUIT": ("QUIT",),
        "VRFY": ("VRFY",),
    }

    def __init__(
        self,
        handler: Any,
        *,
        data_size_limit: int | None = DEFAULTS.data_size_limit,
        enable_SMTPUTF8: bool = DEFAULTS.enable_SMTPUTF8,
        strict_smtputf8: bool = DEFAULTS.strict_smtputf8,
        decode_data: bool = DEFAULTS.decode_data,
        hostname: str | None = DEFAULTS.hostname,
        ident: str | None = DEFAULTS.ident,
        tls_context: Any = DEFAULTS.tls_context,
        require_starttls: bool = DEFAULTS.require_starttls,
        timeout: float | None = DEFAULTS.timeout,
        auth_required: bool = DEFAULTS.auth_required,
        auth_require_tls: bool = DEFAULTS.auth_require_tls,
        auth_exclude_mechanism: Any = DEFAULTS.auth_exclude_mechanism,
        auth_callback: Any = DEFAULTS.auth_callback,
        command_call_limit: int | dict[str, int] | None = DEFAULTS.command_call_limit,
        authenticator: Any = DEFAULTS.authenticator,
        proxy_protocol_timeout: float | None = DEFAULTS.proxy_protocol_timeout,
        loop: asyncio.AbstractEventLoop | None = DEFAULTS.loop,
        pipelining: bool = DEFAULTS.pipelining,
        max_recipients: int | None = DEFAULTS.max_recipients,
        min_data_rate: float = DEFAULTS.min_data_rate,
        enhanced_status_codes: bool = DEFAULTS.enhanced_status_codes,
        chunking: bool = DEFAULTS.chunking,
        dsn: bool = DEFAULTS.dsn,
        proxy_trusted_networks: Any = DEFAULTS.proxy_trusted_networks,
        greeting_delay: float = DEFAULTS.greeting_delay,
        forbid_unauth_pipelining: bool = DEFAULTS.forbid_unauth_pipelining,
        tls_handshake_timeout: float = DEFAULTS.tls_handshake_timeout,
        auth_failure_limit: int = DEFAULTS.auth_failure_limit,
        limiter: Any = DEFAULTS.limiter,
        unknown_command_limit: int = DEFAULTS.unknown_command_limit,
        spool_threshold: int | None = DEFAULTS.spool_threshold,
        spool_directory: str | None = DEFAULTS.spool_directory,
        body_budget: MemoryBudget | None = DEFAULTS.body_budget,
        stages: Iterable[Stage] | None = DEFAULTS.stages,
        soft_error_limit: int = DEFAULTS.soft_error_limit,
        hard_error_limit: int = DEFAULTS.hard_error_limit,
        junk_command_limit: int = DEFAULTS.junk_command_limit,
        error_sleep_time: float = DEFAULTS.error_sleep_time,
    ) -> None:
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = bool(enable_SMTPUTF8)  # (any truthy value, as aiosmtpd takes)
        self._strict_smtputf8 = bool(strict_smtputf8)
        self._decode_data = decode_data
        self.hostname = hostname if hostname is not None else default_hostname()
        self.__ident__ = ident or __ident__
        self.tls_context = tls_context
        if tls_context is not None:
            _check_tls_context(tls_context)
        self._require_starttls = bool(require_starttls and tls_context is not None)
        self._timeout = timeout or None
        if auth_required and not auth_require_tls:
            warnings.warn(
                "Requiring AUTH while not requiring TLS can lead to security vulnerabilities!",
                stacklevel=2,
            )
            _log_once("auth_required == True but auth_require_tls == False")
        self._auth_required = auth_required
        self._auth_require_tls = auth_require_tls
        self._auth_exclude_mechanism = set(auth_exclude_mechanism or ())
        self._auth_callback = auth_callback
        self._authenticator = authenticator
        if proxy_protocol_timeout is not None:
            if proxy_protocol_timeout <= 0:
                raise ValueError("proxy_protocol_timeout must be > 0")
            if proxy_protocol_timeout < 3.0:
                _log_once("proxy_protocol_timeout < 3.0")
        self._proxy_timeout = proxy_protocol_timeout
        self._proxy_networks = parse_networks(proxy_trusted_networks)
        self._greeting_delay = greeting_delay
        self._forbid_unauth_pipelining = bool(forbid_unauth_pipelining)
        self._pipelining = pipelining
        self._max_recipients = max_recipients
        self._min_data_rate = min_data_rate
        self._enhanced = enhanced_status_codes
        self._chunking = chunking
        self._dsn = dsn
        if loop is not None:
            self.loop = loop
        self._call_limits, self._call_limit_default = _call_limits(command_call_limit)
        self._hooks: HookTable = hook_table(handler)
        if self._hooks.old_style_ehlo:
            warnings.warn(
                "Use the 5-argument handle_EHLO() hook instead of the 4-argument handle_EHLO() "
                "hook; support for the 4-argument handle_EHLO() hook will be removed in "
                "version 2.0",
                DeprecationWarning,
                stacklevel=2,
            )
        cls: type = type(self)
        self._verbs = _hook_verbs(cls)
        self._task_verbs = _task_verbs(cls, self._hooks)
        self._tls_handshake_timeout = tls_handshake_timeout
        self._auth_failure_limit = auth_failure_limit
        self._limiter = limiter
        if stages:
            self._stages = stages if isinstance(stages, Stages) else Stages(stages)
        self._unknown_command_limit = unknown_command_limit
        #: Bodies past this many octets go to a spool file (None: all kept in memory).
        self.spool_threshold = spool_threshold
        self.spool_directory = spool_directory
        #: Shared by the sessions of a process: memory held by message bodies (farm.smtp.body).
        self.body_budget = body_budget
        # The framer hands the body over in parts of this size (the Body spools or keeps them).
        self._spill = None if spool_threshold is None else CHUNK_SIZE
        self._announce_auth_mechanisms()
        #: Each session's error limits start as a fresh copy of this (None: all off).
        self._error_limits_template = (
            ErrorLimits(soft_error_limit, hard_error_limit, junk_command_limit, error_sleep_time)
            if any_limit(soft_error_limit, hard_error_limit, junk_command_limit)
            else None
        )
        self._framer_limits = (
            max(self._max_command_size(), SASL_LINE_LIMIT),
            self.line_length_limit,
        )
        self._start_connection_state()

    def _start_connection_state(self) -> None:
        """What each connection has of its own (the rest is configuration, see
        :meth:`protocol_factory`): set here only, so no session can share another's."""
        #: The protocol state of this connection (phase, counters, clocks): farm.smtp.state.
        self._state = state = ConnectionState()
        if self._unknown_command_limit != BOGUS_LIMIT:
            state.unknown_left = self._unknown_command_limit
        if self._error_limits_template is not None:
            self._error_limits = self._error_limits_template.fresh()
        self._framer = Framer(*self._framer_limits)
        self._out: list[str] = []
        self._counts = {"accepted": 0, "rejected": 0, "bytes": 0}
        SMTP._update_checks(self)

    @classmethod
    def protocol_factory(cls: type[_P], handler: Any, **kwargs: Any) -> Callable[[], _P]:
        """A protocol factory for a server: ``cls(handler, **kwargs)`` once per connection,
        but the configuration is worked out once, here (the constructor's checks and warnings
        happen now), and each protocol copies it and starts its own connection state.

        A subclass with its own ``__init__`` is constructed in full for every connection.
        """
        prototype = cls(handler, **kwargs)
        if cls.__init__ is not SMTP.__init__:
            return lambda: cls(handler, **kwargs)
        # The per-connection handles' starting values go in too: read from the instance's
        # own dict, they cost a third of what a miss there and a look at the class does.
        configuration = {
            name: getattr(prototype, name) for name in (*_CONNECTION_DEFAULTS, *_CLASS_SETTINGS)
        }
        configuration.update(prototype.__dict__)
        configuration["_write_batch"] = WriteBatch()  # one per server: its sessions' replies
        if prototype._timeout:
            configuration["_timer_queue"] = TimerQueue(prototype._timeout)
        new = cls.__new__

        def build() -> _P:
            protocol = new(cls)
            protocol.__dict__.update(configuration)
            protocol._start_connection_state()
            return protocol

        return build

    # -- configuration derived once --------------------------------------------------------

    def _max_command_size(self) -> int:
        extra = (26 if self.data_size_limit else 0) + (10 if self.enable_SMTPUTF8 else 0)
        return self.command_size_limit + extra

    def _command_limit(self, verb: str) -> int:
        if verb == "AUTH":
            return SASL_LINE_LIMIT
        esmtp = self.session is not None and self.session.extended_smtp
        limits = self._size_limits
        limit = limits[verb] if esmtp and limits is not None and verb in limits else None
        if limit is None:
            limit = self.command_size_limit
        if verb == "MAIL" and esmtp:
            limit += self._max_command_size() - self.command_size_limit
        return limit

    @property
    def command_size_limits(self) -> dict[str, int]:
        """Line limits by verb after EHLO (aiosmtpd API; MAIL gets SIZE/SMTPUTF8's extra on
        top). A verb left out is limited to ``command_size_limit``."""
        if self._size_limits is None:
            self._size_limits = collections.defaultdict(lambda: self.command_size_limit)
        return self._size_limits

    @property
    def max_command_size_limit(self) -> int:
        """The largest of ``command_size_limits`` (``command_size_limit`` when it is empty)."""
        return max(self.command_size_limits.values(), default=self.command_size_limit)

    @property
    def counts(self) -> dict[str, int]:
        """This session's commands, accepted and rejected messages, and body octets."""
        return {"commands": self._state.commands, **self._counts}

    @property
    def tls_protocol(self) -> Any:
        return self._tls_protocol

    def ehlo_lines(self) -> list[str]:
        """The EHLO reply lines (without the final ``250 HELP``)."""
        return list(
            _ehlo_keywords(
                self.hostname,
                self.data_size_limit,
                self._decode_data,
                self.enable_SMTPUTF8,
                self._pipelining,
                (self._enhanced, self._chunking, self._dsn),
                self.tls_context is not None and self._tls_protocol is None,
                self._auth_mechanism_names()
                if (not self._auth_require_tls or self._tls_protocol is not None)
                else None,
            )
        )

    def _announce_auth_mechanisms(self) -> None:
        """Log the AUTH mechanisms on offer, once per handler (not once per connection)."""
        key = tuple(sorted(self._auth_exclude_mechanism))
        announced = self._hooks.announced
        if key in announced or not log.isEnabledFor(logging.INFO):
            return
        announced.add(key)
        handler_mechanisms = self._hooks.auth_mechanisms
        names = [
            name if name in handler_mechanisms else name + "(builtin)"
            for name in self._auth_mechanism_names()
        ]
        log.info("Available AUTH mechanisms: %s", " ".join(names))

    def _auth_mechanism_names(self) -> tuple[str, ...]:
        names = {*server_mechanisms(type(self)), *self._hooks.auth_mechanisms}
        return tuple(sorted(names - self._auth_exclude_mechanism))

    def _supported_verbs(self) -> str:
        """The commands HELP lists: those with a syntax, offered on this server."""
        return " ".join(sorted(verb for verb, m in self._verbs.items() if offered(self, m)))

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.on_open is not None:
            self.on_open(self)
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self.transport = transport  # type: ignore[assignment]  # a Transport, for the API
        session = self.session = self._create_session()
        session.peer = transport.get_extra_info("peername")
        session.id = f"{_session_prefix}.{next(_session_ids)}"
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # implicit TLS listener
            self._tls_protocol = ssl_object
            session.ssl = tls_session_info(transport)
        self.envelope = self._create_envelope()
        self._state.started = self.loop.time()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session=%s connect peer=%s", session.id, _peer_text(session.peer))
        if self._proxy_timeout:
            self._expect_proxy_header(self._proxy_timeout)
            return
        # With a greeting delay, a client may not speak before the 220, even while we ask
        # the limiter.
        self._state.early_talker_watch = bool(self._greeting_delay)
        if self._limiter is None:
            SMTP._greet_after_delay(self)
            return
        admitted = SMTP._admission(self)
        if admitted is True:
            SMTP._greet_after_delay(self)
        elif admitted is not False:  # the limiter's answer has to be waited for
            SMTP._run_inline(self, self._admit_and_greet(admitted))

    async def _admit_and_greet(self, admitted: Awaitable[bool]) -> None:
        if await admitted:
            SMTP._greet_after_delay(self)

    def _admission(self) -> bool | Awaitable[bool]:
        """The ``limiter``'s admission of this client: now when it answers at once (no
        coroutine per connection), else an awaitable of it."""
        limiter: ClientLimiter | None = self._limiter
        if limiter is None:
            return True
        session = self.session
        key = limiter.session_key(session.peer, session.proxy_data)
        if key is None:
            return True
        answer = limiter.open_session(key)
        if isinstance(answer, bool):
            return SMTP._admission_answered(self, key, answer)
        return self._admission_awaited(key, answer)

    async def _admission_awaited(self, key: str, answer: Awaitable[bool]) -> bool:
        return SMTP._admission_answered(self, key, await answer)

    def _admission_answered(self, key: str, admitted: bool) -> bool:
        """Act on the ``limiter``'s answer for ``key``: refuse (421), or note the key."""
        limiter: ClientLimiter = self._limiter
        session = self.session
        if not admitted:
            log.info("session=%s refused: too many connections from %s", session.id, key)
            if self.stats is not None:
                self.stats.limited["sessions"] += 1
            self._state.ended_how = "error"
            SMTP._reply(self, too_many_connections(self.hostname, key), plain=True)
            self._state.close_after_flush = True
            SMTP._flush(self)
            return False
        if self._state.closed:
            limiter.close_session(key)
            return False
        self._limit_key = key
        return True

    def _mail_allowed(self) -> bool | Awaitable[bool]:
        """The client's message rate (``limiter``): False after replying 450; now when the
        limiter answers at once (no coroutine per MAIL), else an awaitable of it."""
        key = self._limit_key
        limiter: ClientLimiter = self._limiter
        if key is None or not limiter.counts_messages:
            return True
        allowed = limiter.count_message(key)
        if allowed is True:
            return True
        if allowed is False:
            return SMTP._rate_refused(self, "messages", key)
        return self._mail_allowed_awaited(key, allowed)

    async def _mail_allowed_awaited(self, key: str, answer: Awaitable[bool]) -> bool:
        return True if await answer else SMTP._rate_refused(self, "messages", key)

    def _rate_refused(self, kind: str, key: str) -> bool:
        """The limiter refused a MAIL (``kind`` "messages") or AUTH ("auth"): log, count and
        reply; always False."""
        what, reply = _RATE_REFUSALS[kind]
        log.info("session=%s %s from %s", self.session.id, what, key)
        if self.stats is not None:
            self.stats.limited[kind] += 1
        SMTP._reply(self, reply(key))
        return False

    def _greet_after_delay(self) -> None:
        """Greet now, or after ``greeting_delay`` seconds during which the client must be silent."""
        if self._state.close_after_flush or self._state.closed:
            return  # refused meanwhile (an early talker)
        if self._stages is not None:
            self._stages.connect(self.session)
        if not self._greeting_delay:
            SMTP._greet(self)
            return
        self._state.early_talker_watch = True
        self._greet_handle = self.loop.call_later(self._greeting_delay, self._greet)

    def _early_talker(self) -> None:
        """The client spoke before the greeting: a bot that does not wait (Postfix postscreen)."""
        log.info("session=%s spoke before the greeting: refused", self.session.id)
        if self._greet_handle is not None:
            self._greet_handle.cancel()
        SMTP._refuse_unsynchronized(self, "early_talker")
        SMTP._flush(self)

    def _refuse_unsynchronized(self, kind: str) -> None:
        """554 5.5.0 and close, for a client that did not wait (counted by ``kind``)."""
        self._state.ended_how = "error"
        if self.stats is not None:
            self.stats.violations[kind] += 1
        SMTP._reply(self, SYNCHRONIZATION_ERROR, plain=True)
        self._state.close_after_flush = True

    def _greet(self) -> None:
        """Send the 220 greeting and start the idle timer."""
        self._greet_handle = None
        if self._stages is not None and self._stages.on_greet:
            # A stage may decide the greeting (screening's drop); a client that talks while
            # it decides is an early talker too.
            self._state.early_talker_watch = True
            SMTP._run_inline(self, self._greet_after_stages())
            return
        SMTP._send_greeting(self)

    async def _greet_after_stages(self) -> None:
        try:
            stages = self._stages
            assert stages is not None  # only called when there are stages
            refusal = await stages.greet(self.session)
        except Exception:  # a stage's bug: greet (fail open) rather than leave the client
            log.exception("session=%s greeting stage failed", self.session.id)
            refusal = None
        if self._state.close_after_flush or self._state.closed:
            return
        if refusal is None:
            SMTP._send_greeting(self)
            return
        self._state.early_talker_watch = False
        self._state.ended_how = "error"
        SMTP._reply(self, refusal, plain=True)
        self._state.close_after_flush = True
        SMTP._flush(self)

    def _send_greeting(self) -> None:
        self._state.early_talker_watch = False
        state = self._state
        state.phase = Phase.GREETED
        now = state.last_line = self.loop.time()
        if self.stats is not None:
            self.stats.banner.observe(now - state.started)
        SMTP._reply(self, f"220 {self.hostname} {self.__ident__}", plain=True)
        SMTP._flush(self)
        SMTP._start_timer(self)

    def _start_timer(self) -> None:
        """Arm the idle timer (once): it also gives up on hooks that hang."""
        if self._timeout and self._timer is None:
            queue = self._timer_queue
            if queue is not None and queue.timeout == self._timeout:
                queue.add(self, self.loop)
                self._timer = queue
                return
            deadline = self.loop.time() + self._timeout
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            if isinstance(timer, TimerQueue):
                timer.discard(self)
            else:
                timer.cancel()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Reads land in one buffer per thread, copied into the framer at once.

        (Plain asyncio would allocate 256 KiB per read for ``data_received``; with glibc that
        can cost an mmap/munmap pair per read.)
        """
        view = self._read_view
        if view is None:
            # Looked up once per connection: a thread-local read costs more than this lookup.
            try:
                view = _read_buffers.view
            except AttributeError:
                view = _read_buffers.view = memoryview(bytearray(_READ_BUFFER_SIZE))
            self._read_view = view
        return view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self._proxy_parser is not None:
            self._feed_proxy_header(data)
            return
        if self._state.early_talker_watch:
            if not self._state.close_after_flush:
                self._early_talker()
            return
        framer = self._framer
        state = self._state
        if (
            self._task is None
            and not state.write_paused
            and not state.close_after_flush
            and not state.closed
            and (self._error_limits is None or not self._error_limits.delay)
        ):
            line = framer.take_line(data)
            if line is not None:  # a lone command line, nothing buffered: no framing to do
                SMTP._process(self, line)
                return
        framer.feed(data)
        if framer.in_data and self._timeout:
            state.data_deadline = extended_data_deadline(
                state.data_deadline, self.loop.time(), self._timeout, len(data), self._min_data_rate
            )
        if self._task is None and not state.write_paused:
            SMTP._process(self)
        elif self._line_waiter is not None:
            self._feed_line_waiter()
        elif not self._read_paused and (
            state.write_paused  # the client does not read our replies: stop reading it
            or (not framer.in_data and framer.buffered > _MAX_PENDING_INPUT)
        ):
            self._read_paused = True
            self.transport.pause_reading()

    async def _read_line(self) -> bytes | None:
        """Inside a command: the client's next line (a SASL response); None if too long.

        Raises ConnectionAbortedError when the client closes its side meanwhile.
        """
        event = self._framer.next_event()
        if event is None:
            self._line_waiter = self.loop.create_future()
            try:
                event = await self._line_waiter
            finally:
                self._line_waiter = None
        if self._timeout:
            self._state.last_line = self.loop.time()
        return event.line if type(event) is Command else None

    def _feed_line_waiter(self) -> None:
        waiter = self._line_waiter
        if waiter is not None and not waiter.done():
            event = self._framer.next_event()
            if event is not None:
                waiter.set_result(event)

    def eof_received(self) -> bool:
        self._state.eof = True
        waiter = self._line_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionAbortedError("the client closed its side"))
        if self._task is None:
            SMTP._close(self)
        # Keeping a half-closed TLS connection open is not possible (asyncio warns and closes).
        return self._tls_protocol is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state.closed:
            return  # (a failed STARTTLS handshake reports it itself; see smtp_STARTTLS)
        self._state.closed = True
        if self._timer is not None:
            SMTP._cancel_timer(self)
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
            self._proxy_timer = None
        if self._greet_handle is not None:
            self._greet_handle.cancel()
            self._greet_handle = None
        task = self._task
        if task is not None and not self._task_is_delivery:
            task.cancel()
        SMTP._drop_bodies(self)
        if self._limit_key is not None:
            self._limiter.close_session(self._limit_key)
            self._limit_key = None
        if self._stages is not None:
            self._stages.close(self.session)
        if self.stats is not None:
            how = self._state.ended_how or ("error" if exc is not None else "disconnect")
            self.stats.ended[how] += 1
        if log.isEnabledFor(logging.INFO):
            SMTP._log_disconnect(self)
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        self.__dict__.pop("transport", None)  # back to the class's None (typed as set)
        close_hook = self._hooks.hooks.get("CLOSE")
        if close_hook is not None:
            self._call_close_hook(close_hook)
        if self.on_close is not None:
            self.on_close(self)

    def _call_close_hook(self, hook: Any) -> None:
        """``handle_CLOSE(server, session, envelope)``: the connection is gone (a farm extension,
        for handlers holding per-session resources). What it returns to be awaited runs in its
        own task (a plain function's result that is not awaitable: nothing more to do); errors
        are logged."""
        try:
            result = hook(self, self.session, self.envelope)
        except Exception:
            log.exception("session=%s handle_CLOSE failed", self.session.id)
            return
        if not inspect.isawaitable(result):
            return

        async def close() -> None:
            try:
                await result
            except Exception:
                log.exception("session=%s handle_CLOSE failed", self.session.id)

        task = self.loop.create_task(close())
        _close_tasks.add(task)
        task.add_done_callback(_close_tasks.discard)

    def _log_disconnect(self) -> None:
        """The session's one line, at its end (its messages had a line each)."""
        session = self.session
        counts = self._counts
        if session is None:
            return
        log_fields(
            log,
            SessionLine,
            (
                session,
                self._state.commands,
                counts["accepted"],
                counts["rejected"],
                counts["bytes"],
                self._state.ended_how or "disconnect",
                (self.loop.time() - self._state.started) if self.loop else 0.0,
                self._stages.session_log(session) if self._stages else "",
            ),
        )

    def pause_writing(self) -> None:
        """The client does not read our replies: stop reading it too (bounded memory), and
        drop it if it still has not read them after the write stall limit."""
        state = self._state
        state.write_paused = True
        if self.loop is None or self.transport is None:
            return
        state.write_paused_at = self.loop.time()
        if self._task is None and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        timer = self._timer
        if timer is None:
            armed = None
        elif isinstance(timer, TimerQueue):
            armed = timer.when(self)
        else:
            armed = timer.when()
        at = timer_on_write_pause(state, armed, self._timeout, self.write_stall_limit)
        if at is not None:
            SMTP._cancel_timer(self)
            self._timer = self.loop.call_at(at, self._on_timer)

    def resume_writing(self) -> None:
        self._state.write_paused = False
        if self._task is None and not self._state.closed:
            SMTP._process(self)

    # -- graceful shutdown -----------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Finish the transaction in flight (if any), then answer 421 and close."""
        self._state.draining = True
        self._checks = True
        transport = self.transport
        if self._state.in_tls_handshake or (
            # closing already, every reply handed over: only a TLS close_notify may be awaited
            transport is not None
            and transport.is_closing()
            and not transport.get_write_buffer_size()
        ):
            self.abort()  # no transaction can be in flight: nothing to finish
            return
        if self._task is None and not self._state.closed:
            SMTP._finish_drain_if_idle(self)
            SMTP._flush(self)

    async def wait_closed(self) -> None:
        """Wait until the connection is closed.

        The waits share one future, shielded: a wait cancelled (say, by the timeout of a
        drain's first phase) ends only itself, not every later wait with it.
        """
        if self._state.closed or self.transport is None:
            return
        if self._closed_waiter is None:
            self._closed_waiter = self.loop.create_future()
        await asyncio.shield(self._closed_waiter)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _finish_drain_if_idle(self) -> None:
        if (
            self._state.draining
            and not self._state.close_after_flush
            and not self._framer.in_data
            and self.envelope is not None
            and self.envelope.mail_from is None
        ):
            SMTP._reply(self, SHUTTING_DOWN)
            self._state.close_after_flush = True
            self._state.ended_how = "shutdown"

    # -- the input loop --------------------------------------------------------------------

    def _process(self, line: bytes | None = None) -> None:
        """Handle the input framed so far (``line``: a command line taken before it)."""
        framer = self._framer
        limits = self._error_limits
        state = self._state
        # After a lone command line (nothing buffered) only a zero-octet BDAT chunk can be
        # an event already: otherwise the framer has nothing to look at.
        pending = True
        if line is not None:
            SMTP._on_command(self, line)
            pending = framer.chunk_left is not None
        while self._task is None and not state.close_after_flush and not state.closed:
            if limits is not None and limits.delay:  # past the soft limit: the replies wait
                self._pause_for_errors(limits)
                break
            if not pending:
                break
            event = framer.next_event()
            if event is None:
                if limits is not None and limits.delay:
                    self._pause_for_errors(limits)
                break
            if type(event) is Command:
                if (
                    self._forbid_unauth_pipelining
                    and framer.buffered
                    and SMTP._sent_too_soon(self, event.line)
                ):
                    break
                SMTP._on_command(self, event.line)
            elif type(event) is Message:
                SMTP._on_message(self, event)
            elif type(event) is Chunk:
                self._on_chunk(event)
            elif type(event) is BodyPart:
                body = self._body if self._body is not None else self._bdat_content
                assert body is not None  # a BodyPart comes only while a body is open
                body.write(event.data)
            else:
                state.commands += 1
                SMTP._reply(self, "500 Command line too long")
            if len(self._out) >= _REPLIES_PER_WRITE:
                SMTP._flush(self)
                if state.write_paused:
                    break  # the client is not reading: the rest waits for resume_writing
        if state.draining and self._task is None:
            SMTP._finish_drain_if_idle(self)
        SMTP._flush(self)
        if self._read_paused and self._task is None and not state.closed and not state.write_paused:
            self._read_paused = False
            self.transport.resume_reading()
        if state.eof and self._task is None:
            SMTP._close(self)

    def _sent_too_soon(self, line: bytes) -> bool:
        """``line`` came with more input behind it: refuse the client (554, close) if the rules
        of pipelining did not allow it to send on before this command's reply."""
        session = self.session
        if not sent_too_soon(line, self._pipelining and session.extended_smtp):
            return False
        verb = command_verb(line)
        log.info(
            "session=%s sent on before the reply to %s: refused (SMTP protocol synchronization)",
            session.id,
            verb if verb.isalpha() and len(verb) <= 16 else "a command",
        )
        self._state.commands += 1
        SMTP._refuse_unsynchronized(self, "pipelining")
        return True

    def _on_command(self, line: bytes) -> None:
        state = self._state
        state.commands += 1
        if self._timeout:
            state.last_line = self.loop.time()
        parts = split_command(line, self.enable_SMTPUTF8)
        if parts is None:
            SMTP._reply(self, "500 Error: strict ASCII mode")
            return
        verb, arg = parts
        if not verb:
            SMTP._reply(self, "500 Error: bad syntax")
            return
        if (len(line) > self.command_size_limit or self._size_limits is not None) and len(
            line
        ) > self._command_limit(verb):
            SMTP._reply(self, "500 Command line too long")
            return
        if _has_control_characters(line) is not None:
            SMTP._reply(self, "501 5.5.2 Syntax error: invalid character in command")
            return
        state.verb = verb
        method = self._verbs.get(verb)
        stats = self.stats
        if stats is not None:
            # WorkerStats.command, inline (per command); the keys are the verbs offered and
            # "unknown", so the table stays small.
            counted = verb if method is not None else "unknown"
            commands = stats.commands
            commands[counted] = commands.get(counted, 0) + 1
        if self._checks and self._refused(verb, method is not None):
            if verb == "BDAT":
                self._skip_refused_chunk(arg)
            return
        limits = self._error_limits
        if limits is not None and verb in JUNK_COMMANDS and limits.count_junk(self._state.commands):
            self._too_many_errors(limits)
            return  # that junk command was one error too many: 421 and close
        if method is None:
            state.unknown_left -= 1
            if state.unknown_left < 1:
                SMTP._reply(self, "502 5.5.1 Too many unrecognized commands, goodbye.")
                self._state.close_after_flush = True
            else:
                SMTP._reply(self, f'500 Error: command "{verb}" not recognized')
            return
        coro = method(self, arg)
        if verb in self._task_verbs:
            self._run(coro)
            return
        SMTP._run_inline(self, coro)

    def _run_inline(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` right here; if it has to wait after all (say, for the ``limiter``), it
        goes on in a task from where it stopped. Most commands never wait: no task for them."""
        try:
            waiting_for = coro.send(None)
        except StopIteration:
            return
        except Exception as error:
            self._command_failed(error)
            return
        self._run(_resume(coro, waiting_for))

    def _command_failed(self, error: BaseException) -> None:
        """A command raised: the handler's ``handle_exception`` gives the reply (else 451).

        A ``ConnectionResetError`` ends the session without a reply (aiosmtpd does the same).
        """
        session_id = self.session.id
        if isinstance(error, ConnectionResetError):
            log.info("session=%s connection reset during a command: closing", session_id)
            self._state.close_after_flush = True
            return
        if self._hooks.handle_exception is None:
            log.error("session=%s internal error", session_id, exc_info=error)
            SMTP._reply(self, LOCAL_ERROR)
            return

        async def reply() -> None:
            SMTP._reply(self, await self._handle_exception(error))

        self._run(reply())

    def _update_checks(self) -> None:
        """Whether commands must pass the policy checks of :meth:`_refused` (rarely)."""
        self._checks = gate_needed(
            self._state,
            self._require_starttls and self._tls_protocol is None,
            self._call_limits is not None,
            self._auth_required,
        )

    def _refused(self, verb: str, known: bool) -> bool:
        """Apply TLS, drain, call-limit and AUTH policies (farm.smtp.state); True when a reply
        was given."""
        state = self._state
        refusal = refusal_before_verb(
            verb,
            state,
            self._require_starttls and self._tls_protocol is None,
            self.envelope.mail_from is not None,
        )
        if refusal is None and known:
            if self._call_limits is not None:
                counts = state.call_counts
                if counts is None:
                    counts = state.call_counts = {}
                if call_limit_exceeded(counts, self._call_limits, self._call_limit_default, verb):
                    log.warning("session=%s %s sent too many times", self.session.id, verb)
                    refusal = too_many_calls(verb)
            if refusal is None:
                refusal = refusal_for_auth(
                    verb, self._auth_required, bool(self.session.authenticated)
                )
        if refusal is None:
            return False
        SMTP._reply(self, refusal.reply)
        if refusal.close:
            self._state.close_after_flush = True
        return True

    def _run(self, coro: Coroutine[Any, Any, None], delivery: bool = False) -> None:
        """Run a command or delivery coroutine that may suspend, in a task."""
        self._task_is_delivery = delivery
        self._state.task_started = self.loop.time()
        self._task = task = self.loop.create_task(coro)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if self._timeout and self.loop is not None:
            self._state.last_line = self.loop.time()  # the client's idle time starts now
        if task.cancelled() or self._state.closed:
            return
        error = task.exception()
        if error is not None:
            self._command_failed(error)
            if self._task is not None:
                return  # handle_exception runs; its task's end goes on from here
        SMTP._process(self)

    # -- output ----------------------------------------------------------------------------

    def _reply(self, text: str, plain: bool = False) -> None:
        """Queue a reply; ``plain``: never add enhanced status codes (greeting, EHLO)."""
        if "\n" in text:
            text = format_multiline(text)
        if self._enhanced and not plain:
            text = with_enhanced_code(text, self._state.verb)
        stats = self.stats
        if stats is not None:
            # WorkerStats.reply_text, inline (per reply): by the code's first digit.
            digits = stats.reply_digits
            first = text[:1]
            if first in digits:
                digits[first] += 1
        self._out.append(text)
        limits = self._error_limits
        if (
            limits is not None
            # (a success reply with no errors so far leaves the limits as they are)
            and (limits.errors or text[:1] not in ("2", "3"))
            and not self._state.close_after_flush
            and limits.count_reply(text, self._state.commands)
        ):
            self._too_many_errors(limits)

    def _too_many_errors(self, limits: ErrorLimits) -> None:
        """The hard error limit is reached: ``421`` and close."""
        log.info("session=%s too many errors (%d): closing", self.session.id, limits.errors)
        self._state.ended_how = "error"
        self._state.close_after_flush = True
        SMTP._reply(self, f"421 4.7.0 {self.hostname} Error: too many errors")

    def _pause_for_errors(self, limits: ErrorLimits) -> None:
        """Hold the replies so far for the error delay; no input is handled meanwhile."""
        delay = limits.take_delay()
        if self._timeout:
            delay = min(delay, self._timeout / 2)  # never taken for a hung hook
        self._held = True
        self._run(self._error_pause(delay))

    async def _error_pause(self, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._held = False

    async def push(self, status: str) -> None:
        """Queue a reply line (aiosmtpd API); it is written with the command's other replies."""
        SMTP._reply(self, status)

    def _flush(self, now: bool = False) -> None:
        """Send the queued replies: at the end of the loop's pass (:class:`WriteBatch`), or
        ``now`` (then with any held before them)."""
        state = self._state
        if self._held and not state.close_after_flush:
            return  # an error delay runs: the replies go when it ends
        out = self._out
        if out:
            text = out[0] + "\r\n" if len(out) == 1 else "\r\n".join(out) + "\r\n"
            out.clear()
            if self.transport is not None and not state.closed:
                data = text.encode("utf-8", "surrogateescape")
                deferred = self._deferred
                if deferred is not None:  # replies already held: all go now, in order
                    self._deferred = None
                    self.transport.write(deferred + data)
                elif (
                    now
                    or self._write_batch is None
                    or state.close_after_flush
                    or len(data) > WriteBatch.HOLD_LIMIT
                ):
                    self.transport.write(data)
                else:
                    self._deferred = data
                    batch = self._write_batch
                    if not batch.waiting:  # WriteBatch.hold, inline (per reply)
                        self.loop.call_soon(batch.write)
                    batch.waiting.append(self)
        elif now and self._deferred is not None:
            self._write_deferred()
        if state.close_after_flush:
            SMTP._close(self)

    def _write_deferred(self) -> None:
        """Write the replies held for the end of the loop's pass (WriteBatch)."""
        data, self._deferred = self._deferred, None
        transport = self.transport
        # (A transport a handler closed meanwhile drops them, as an abort would.)
        if data is not None and transport is not None and not transport.is_closing():
            transport.write(data)

    def _close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self._deferred is not None:
                self._write_deferred()
            transport.close()
            # A client that does not read would hold the connection open forever; over TLS,
            # one that never answers our close_notify would, for the 30 s of asyncio's wait.
            if self._tls_protocol is not None or transport.get_write_buffer_size():
                self.loop.call_later(_CLOSE_GRACE, self._abort_unflushed, transport)

    def _abort_unflushed(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is transport:
            log.info(
                "session=%s replies not read within %ss: aborting", self.session.id, _CLOSE_GRACE
            )
            transport.abort()

    def _on_timer(self) -> None:
        """The session's one timer: act on what expired (farm.smtp.deadlines), or re-arm."""
        self._timer = None
        if self._state.closed or self.transport is None:
            return
        now = self.loop.time()
        state = self._state
        expired, at = next_deadline(
            state,
            now,
            self._timeout,
            self.write_stall_limit,
            self._task is not None,
            self._framer.in_data,
        )
        if expired is Expired.NOTHING:
            if at is not None:
                self._timer = self.loop.call_at(at, self._on_timer)
            return
        if expired is Expired.WRITE_STALL:
            log.info(
                "session=%s replies not read for %ss: closing",
                self.session.id,
                round(now - state.write_paused_at, 1),
            )
            self._state.ended_how = "timeout"
            self.transport.abort()
            return
        if expired is Expired.HOOK:
            # A hung hook: give up on it like a hung client (aiosmtpd closes here too).
            log.warning(
                "session=%s handler hook exceeded the %ss timeout", self.session.id, self._timeout
            )
            task = self._task
            assert task is not None  # HOOK expires only while a task runs
            self._task = None
            task.cancel()
            SMTP._reply(self, LOCAL_ERROR)
        else:
            log.info("session=%s timeout", self.session.id)
            self._state.ended_how = "timeout"
            SMTP._reply(self, f"421 4.4.2 {self.hostname} Error: timeout exceeded")
        self._state.close_after_flush = True
        SMTP._flush(self)

    # -- hooks -----------------------------------------------------------------------------

    def _create_session(self) -> Session:
        return Session(self.loop)

    def _create_envelope(self) -> Envelope:
        return Envelope()

    def _set_rset_state(self) -> None:
        self.envelope = self._create_envelope()
        SMTP._drop_bodies(self)

    def _set_post_data_state(self) -> None:
        self.envelope = self._create_envelope()
        SMTP._drop_bodies(self)

    def _new_body(self) -> Body:
        return Body(self.spool_threshold, self.spool_directory, self.body_budget)

    def _drop_bodies(self) -> None:
        """Free a body still being received (RSET, a refused message, a lost connection)."""
        if self._body is None and self._bdat_content is None:
            return
        for body in (self._body, self._bdat_content):
            if body is not None:
                body.close()
        self._body = None
        self._bdat_content = None

    def _no_room_for_a_body(self) -> bool:
        """Whether the process's memory budget for bodies is used up (then 452 4.3.1)."""
        budget = self.body_budget
        if budget is None or not budget.exhausted():
            return False
        log.warning(
            "session=%s %s refused: bodies in memory %d >= budget %d octets",
            self.session.id,
            self._state.verb,
            budget.used,
            budget.limit,
        )
        return True

    async def _call_handler_hook(self, name: str, *args: Any) -> Any:
        hook = self._hooks.hooks.get(name)
        if hook is None:
            return MISSING
        started = self.loop.time()
        try:
            status = hook(self, self.session, self.envelope, *args)
            # (inspect.isawaitable, but quick for what hooks return: a coroutine or a reply)
            if type(status) is CoroutineType or (
                type(status) is not str and inspect.isawaitable(status)
            ):
                if self._task is None:
                    # Not in a command's task: a plain hook's awaitable (see _inline_hook) runs
                    # in a task of its own, as an async hook does (asyncio.timeout needs one).
                    status = asyncio.ensure_future(status, loop=self.loop)
                status = await status
        except BodyMemoryExceeded as error:  # the handler read a spooled body whole
            log.warning("session=%s handle_%s: %s", self.session.id, name, error)
            status = INSUFFICIENT_STORAGE
        except ConnectionResetError:
            raise  # the session ends without a reply (see _command_failed)
        except Exception as error:
            status = await self._handle_exception(error)
        stats = self.stats
        if stats is not None:
            # WorkerStats.handler_time, inline (per hook call) once the hook has its histogram.
            histogram = stats.handlers.get(name)
            if histogram is None:
                stats.handler_time(name, self.loop.time() - started)
            else:
                histogram.observe(self.loop.time() - started)
        if status is None:
            log.warning("session=%s handle_%s returned no reply", self.session.id, name)
            return LOCAL_ERROR
        return status

    async def _handle_exception(self, error: BaseException) -> str:
        handler = self._hooks.handle_exception
        if handler is not None:
            try:
                status = handler(error)
                if inspect.isawaitable(status):
                    status = await status
            except Exception:
                log.exception("session=%s handle_exception failed", self.session.id)
                return LOCAL_ERROR
            return status if status else LOCAL_ERROR
        log.error("session=%s handler error", self.session.id, exc_info=error)
        return LOCAL_ERROR

    # -- DATA completion -------------------------------------------------------------------

    def _on_message(self, message: Message, body: Body | None = None) -> None:
        """The end of a message: ``message.content`` ends ``body`` (default: the DATA body
        received so far in BodyParts, if any)."""
        self._state.verb = "DATA"
        self._counts["bytes"] += message.size
        if self._timeout:
            self._state.last_line = self.loop.time()
        envelope = self.envelope
        if body is None:
            body, self._body = self._body, None
        status: str | None
        if message.error is not None:
            if body is not None:
                body.close()
            self._set_post_data_state()
            if message.error is DataError.LINE_TOO_LONG:
                status = "500 Line too long (see RFC5321 4.5.3.1.6)"
            else:
                status = "552 Error: Too much mail data"
            SMTP._end_message(self, status, message.size, envelope)
            return
        if body is None:
            body = SMTP._new_body(self)
        body.write(message.content)
        status = None
        if body.error is not None:
            log.warning("session=%s message not kept: %s", self.session.id, body.error)
            status = INSUFFICIENT_STORAGE
        elif self._decode_data and not self.enable_SMTPUTF8 and not body.ascii:
            status = "500 Error: strict ASCII mode"
        if status is not None:
            body.close()
            self._set_post_data_state()
            SMTP._end_message(self, status, message.size, envelope)
            return
        envelope.body = body
        if self._decode_data:
            envelope.content_encoding = "utf-8" if self.enable_SMTPUTF8 else "ascii"
        if "DATA" in self._hooks.hooks or (
            self._stages is not None and self._stages.on_end_of_data
        ):
            self._run(self._deliver(message.size), delivery=True)
        else:
            self._set_post_data_state()
            SMTP._end_message(self, "250 OK", message.size, envelope)

    def _decoded(self, content: bytes) -> bytes | str:
        """Edited content as the handler gets it (``decode_data``: text)."""
        if not self._decode_data:
            return content
        return content.decode("utf-8" if self.enable_SMTPUTF8 else "ascii", "surrogateescape")

    async def _deliver(self, size: int) -> None:
        envelope = self.envelope
        status = None
        if self._stages is not None and self._stages.on_end_of_data:
            try:
                status = await self._stages.end_of_data(self.session, envelope, self._decoded)
            except BodyMemoryExceeded as error:  # a stage read a spooled body whole
                log.warning("session=%s end-of-data stage: %s", self.session.id, error)
                status = INSUFFICIENT_STORAGE
            except Exception:  # a stage's bug: never a 250 for a message it did not check
                log.exception("session=%s end-of-data stage failed", self.session.id)
                status = LOCAL_ERROR
        if status is None:
            status = await self._call_handler_hook("DATA")
            if status is MISSING:
                status = "250 OK"
        self._set_post_data_state()
        SMTP._end_message(self, status, size, envelope)

    def _data_replies(self, status: Any, envelope: Envelope | None) -> list[str]:
        """The reply lines for a finished message: one for SMTP (LMTP: one per recipient)."""
        if isinstance(status, str):
            return [status]
        log.error(
            "session=%s handle_DATA returned %s, not a reply string",
            self.session.id,
            type(status).__name__,
        )
        return [LOCAL_ERROR]

    def _end_message(self, status: Any, size: int, envelope: Envelope | None = None) -> None:
        replies = self._data_replies(status, envelope)
        if len(replies) == 1:
            status = replies[0]
            accepted = status[:1] == "2"
        else:
            accepted = any(reply.startswith("2") for reply in replies)
            status = replies[0] if len(set(r[:3] for r in replies)) == 1 else "mixed"
        self._counts["accepted" if accepted else "rejected"] += 1
        if accepted and self._error_limits is not None:
            self._error_limits.forgive()
        stats = self.stats
        if stats is not None:
            stats.messages["accepted" if accepted else "rejected"] += 1
            stats.received_bytes += size
            stats.sizes.observe(size)
        for reply in replies:
            SMTP._reply(self, reply)
        if log.isEnabledFor(logging.INFO):  # (nothing to work out for it otherwise)
            log_fields(
                log,
                MessageLine,
                (
                    self.session,
                    self._counts["accepted"] + self._counts["rejected"],
                    envelope.mail_from if envelope else None,
                    len(envelope.rcpt_tos) if envelope else 0,
                    size,
                    status[:3],
                    self.loop.time() - self._state.data_started,
                    SMTP._message_notes(self, envelope) if envelope is not None else "",
                ),
            )

    def _message_notes(self, envelope: Envelope) -> str:
        """What the stages and the handler add to a message's log line (``" k=v ..."``)."""
        notes = self._stages.message_log(self.session, envelope) if self._stages else ""
        handler_note = getattr(envelope, "log_note", "")
        return f"{notes} {handler_note}" if handler_note else notes

    # -- commands (aiosmtpd names; the docstring is the HELP syntax) -------------------------

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str | None) -> None:
        """HELO hostname"""
        if not hostname:
            SMTP._reply(self, "501 Syntax: HELO hostname")
            return
        self._set_rset_state()
        self.session.extended_smtp = False
        status = (
            await self._call_handler_hook("HELO", hostname)
            if "HELO" in self._hooks.hooks
            else MISSING
        )
        if status is MISSING:
            self.session.host_name = hostname
            status = f"250 {self.hostname}"
        SMTP._reply(self, status)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str | None) -> None:
        """EHLO hostname"""
        if not hostname:
            SMTP._reply(self, "501 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        self.session.extended_smtp = True
        lines = self.ehlo_lines()
        if hasattr(self, "ehlo_hook"):
            await self._deprecated_hook("ehlo_hook", "EHLO")
        if "EHLO" not in self._hooks.hooks:
            self.session.host_name = hostname
            lines.append("250 HELP")
        elif self._hooks.old_style_ehlo:
            status = await self._call_handler_hook("EHLO", hostname)
            lines.append(status)
        else:
            lines.append("250 HELP")
            result = await self._call_handler_hook("EHLO", hostname, lines)
            lines = [result] if isinstance(result, str) else list(result)
        SMTP._reply(self, "\r\n".join(lines), plain=True)

    async def _deprecated_hook(self, name: str, verb: str) -> None:
        """aiosmtpd's deprecated ``ehlo_hook``/``rset_hook`` methods of an SMTP subclass."""
        warnings.warn(
            f"Use handler.handle_{verb}() instead of .{name}()", DeprecationWarning, stacklevel=3
        )
        result = getattr(self, name)()
        if inspect.isawaitable(result):
            await result

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str | None) -> None:
        """NOOP [ignored]"""
        status = (
            await self._call_handler_hook("NOOP", arg) if "NOOP" in self._hooks.hooks else MISSING
        )
        SMTP._reply(self, "250 OK" if status is MISSING else status)

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str | None) -> None:
        """QUIT"""
        if arg:
            SMTP._reply(self, "501 Syntax: QUIT")
            return
        status = await self._call_handler_hook("QUIT") if "QUIT" in self._hooks.hooks else MISSING
        SMTP._reply(self, "221 Bye" if status is MISSING else status)
        self._state.close_after_flush = True
        self._state.ended_how = "quit"

    @syntax("RSET")
    async def smtp_RSET(self, arg: str | None) -> None:
        """RSET"""
        if arg:
            SMTP._reply(self, "501 Syntax: RSET")
            return
        self._set_rset_state()
        if hasattr(self, "rset_hook"):
            await self._deprecated_hook("rset_hook", "RSET")
        status = await self._call_handler_hook("RSET") if "RSET" in self._hooks.hooks else MISSING
        SMTP._reply(self, "250 OK" if status is MISSING else status)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str | None) -> None:
        """HELP [command]"""
        code = 250
        if arg:
            method = self._verbs.get(arg.upper())
            if method is not None and offered(self, method):
                extended = self.session.extended_smtp
                SMTP._reply(self, "250 Syntax: " + syntax_text(method, extended))
                return
            code = 501
        SMTP._reply(self, f"{code} Supported commands: {self._supported_verbs()}")

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        """VRFY <address>"""
        if not arg:
            SMTP._reply(self, "501 Syntax: VRFY <address>")
            return
        address, _ = parse_path(arg, self.local_part_limit)
        if not address:
            SMTP._reply(self, f"502 Could not VRFY {arg}")
            return
        status = (
            await self._call_handler_hook("VRFY", address)
            if "VRFY" in self._hooks.hooks
            else MISSING
        )
        SMTP._reply(
            self,
            "252 Cannot VRFY user, but will accept message and attempt delivery"
            if status is MISSING
            else status,
        )

    async def smtp_EXPN(self, arg: str | None) -> None:
        """EXPN <address>"""
        SMTP._reply(self, "502 EXPN not implemented")

    #: The reply to a transaction command sent before HELO/EHLO (LMTP: LHLO).
    _helo_required = HELO_FIRST

    def _ordering_refusal(self, verb: str) -> str | None:
        """The command-order rule ``verb`` breaks now, if any (farm.smtp.state)."""
        envelope = self.envelope
        return ordering_refusal(
            verb, self.session.host_name, envelope.mail_from, envelope.rcpt_tos, self._helo_required
        )

    def _out_of_order(self, verb: str) -> bool:
        """Reply and return True when ``verb`` breaks the command order."""
        envelope = self.envelope
        refusal = ordering_refusal(
            verb, self.session.host_name, envelope.mail_from, envelope.rcpt_tos, self._helo_required
        )
        if refusal is None:
            return False
        SMTP._reply(self, refusal)
        return True

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL FROM: <address>"""
        if SMTP._out_of_order(self, "MAIL"):
            return
        envelope = self.envelope
        request = parse_mail(
            arg,
            esmtp=self.session.extended_smtp,
            in_transaction=bool(envelope.mail_from),
            local_part_limit=self.local_part_limit,
            dsn=self._dsn,
            decode_data=self._decode_data,
            smtputf8_enabled=self.enable_SMTPUTF8,
            data_size_limit=self.data_size_limit,
        )
        if isinstance(request, str):
            SMTP._reply(self, request)
            return
        address, mail_options, smtputf8 = request
        if self._strict_smtputf8:
            refusal = utf8_refusal(address, smtputf8)
            if refusal is not None:
                SMTP._reply(self, refusal)
                return
        if self._limit_key is not None:
            allowed = SMTP._mail_allowed(self)
            if allowed is not True and (allowed is False or not await allowed):
                return
        envelope.smtp_utf8 = smtputf8
        self._state.data_started = self.loop.time()
        if self._stages is not None and self._stages.on_mail:
            refusal = await self._stages.mail(self.session, envelope, address)
            if refusal is not None:
                SMTP._reply(self, refusal)
                return
        status = (
            await self._call_handler_hook("MAIL", address, mail_options)
            if "MAIL" in self._hooks.hooks
            else MISSING
        )
        if status is MISSING:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            status = "250 OK"
        SMTP._reply(self, status)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT TO: <address>"""
        if SMTP._out_of_order(self, "RCPT"):
            return
        envelope = self.envelope
        request = parse_rcpt(
            arg,
            esmtp=self.session.extended_smtp,
            recipients=len(envelope.rcpt_tos),
            local_part_limit=self.local_part_limit,
            dsn=self._dsn,
            max_recipients=self._max_recipients,
        )
        if isinstance(request, str):
            SMTP._reply(self, request)
            return
        address, rcpt_options = request
        if self._strict_smtputf8:
            refusal = utf8_refusal(address, envelope.smtp_utf8)
            if refusal is not None:
                SMTP._reply(self, refusal)
                return
        if self._stages is not None and self._stages.on_rcpt:
            refusal = await self._stages.rcpt(self.session, envelope, address)
            if refusal is not None:
                SMTP._reply(self, refusal)
                return
        status = (
            await self._call_handler_hook("RCPT", address, rcpt_options)
            if "RCPT" in self._hooks.hooks
            else MISSING
        )
        if status is MISSING:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            status = "250 OK"
        SMTP._reply(self, status)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """DATA"""
        if SMTP._out_of_order(self, "DATA"):
            return
        if arg:
            SMTP._reply(self, "501 Syntax: DATA")
            return
        if self._bdat_content is not None:
            SMTP._reply(self, DATA_AFTER_BDAT)
            return
        if SMTP._no_room_for_a_body(self):
            SMTP._reply(self, INSUFFICIENT_STORAGE)
            return
        SMTP._reply(self, "354 End data with <CR><LF>.<CR><LF>")
        self._body = SMTP._new_body(self)
        self._framer.start_data(self.data_size_limit, self._spill)
        if self._timeout:
            self._state.data_deadline = self.loop.time() + self._timeout

    # -- BDAT (RFC 3030; the rules are farm.smtp.chunking's) ---------------------------------

    @syntax("BDAT <size> [LAST]", when="_chunking")
    async def smtp_BDAT(self, arg: str | None) -> None:
        """BDAT <size> [LAST]"""
        if not self._chunking:
            SMTP._reply(self, '500 Error: command "BDAT" not recognized')
            return
        bdat = parse_bdat(arg)
        if bdat is None:
            # Without a size the chunk's end is unknown: the stream cannot be trusted any more.
            SMTP._reply(self, BDAT_SYNTAX)
            self._state.close_after_flush = True
            return
        content = self._bdat_content
        refusal = chunk_refusal(
            SMTP._ordering_refusal(self, "BDAT"),
            None if content is None else content.size,
            bdat.size,
            self.data_size_limit,
            self._no_room_for_a_body,
        )
        if refusal is not None:
            self._framer.start_chunk(bdat.size, keep=False)
        else:
            self._framer.start_chunk(bdat.size, spill=self._spill)
            if content is None:
                self._bdat_content = SMTP._new_body(self)
        self._state.bdat_last, self._state.bdat_refusal = bdat.last, refusal
        if self._timeout:
            self._state.data_deadline = self.loop.time() + self._timeout

    def _skip_refused_chunk(self, arg: str | None) -> None:
        """A ``BDAT`` refused before :meth:`smtp_BDAT` ran (a policy check answered it): its
        chunk is still read and dropped, unanswered, so its octets never run as commands;
        without a valid size the stream cannot be trusted and the connection closes."""
        if not self._chunking:
            return  # BDAT is then an unknown command, as in aiosmtpd
        size = chunk_size_to_skip(arg)
        if size is None:
            self._state.close_after_flush = True
            return
        self._framer.start_chunk(size, keep=False)
        self._state.bdat_last, self._state.bdat_refusal = False, ""

    def _on_chunk(self, chunk: Chunk) -> None:
        last, refusal = self._state.bdat_last, self._state.bdat_refusal
        self._state.bdat_last, self._state.bdat_refusal = False, None
        if refusal == "":
            return  # refused before smtp_BDAT: already answered
        if refusal is not None:
            if refusal.startswith("552"):
                # The transaction is over; only its last chunk gets (LMTP: per-recipient) replies.
                self._counts["bytes"] += chunk.size
                envelope = self.envelope
                self._set_post_data_state()
                if last:
                    SMTP._end_message(self, refusal, chunk.size, envelope)
                else:
                    self._counts["rejected"] += 1
                    SMTP._reply(self, refusal)
            else:
                SMTP._reply(self, refusal)
            return
        content = self._bdat_content
        assert content is not None
        content.write(chunk.data)
        if not last:
            SMTP._reply(self, chunk_accepted(chunk.size))
            return
        self._bdat_content = None
        SMTP._on_message(self, Message(b"", content.size), content)

    # -- the PROXY header (farm.smtp.proxy_header parses it) ---------------------------------

    def _expect_proxy_header(self, timeout: float) -> None:
        """At connection: wait ``timeout`` seconds for the header (an untrusted peer is
        dropped at once)."""
        session = self.session
        if not peer_trusted(session.peer, self._proxy_networks):
            log.warning("session=%s PROXY header from an untrusted peer refused", session.id)
            self.transport.abort()
            return
        self._proxy_parser = ProxyParser()
        self._proxy_timer = self.loop.call_later(timeout, self._proxy_header_late)

    def _proxy_header_late(self) -> None:
        if self._proxy_parser is not None and self.transport is not None:
            log.info("session=%s no PROXY header in time: closing", self.session.id)
            self._proxy_parser = None
            self.transport.abort()

    def _feed_proxy_header(self, data: bytes | memoryview) -> None:
        parser = self._proxy_parser
        assert parser is not None
        result = parser.feed(data)
        if result is None:
            return
        self._proxy_parser = None
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
            self._proxy_timer = None
        if not result.valid:
            log.info("session=%s bad PROXY header: %s", self.session.id, result.error)
            self.transport.abort()
            return
        self.session.proxy_data = result
        if self._greeting_delay:
            # The client must wait for the 220: bytes after the header are an early talk.
            self._state.early_talker_watch = True
            if result.trailing:
                self._early_talker()
                return
        self._framer.feed(result.trailing)  # what followed the header comes first
        self._run(self._accept_proxy(result))
        SMTP._start_timer(self)  # a hung handle_PROXY is given up like any hung hook

    async def _accept_proxy(self, proxy_data: ProxyData) -> None:
        hook = self._hooks.hooks.get("PROXY")
        accepted = False
        if hook is not None:
            try:
                accepted = bool(await hook(self, self.session, self.envelope, proxy_data))
            except Exception:
                log.exception("session=%s handle_PROXY failed", self.session.id)
        if not accepted:
            log.info("session=%s PROXY header not accepted by the handler", self.session.id)
            self._state.close_after_flush = True
            return
        admitted = SMTP._admission(self)
        if admitted is True or (admitted is not False and await admitted):
            SMTP._greet_after_delay(self)

    # -- AUTH (RFC 4954; the rules and the exchange are farm.smtp.sasl's) --------------------

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str | None) -> None:
        """AUTH <mechanism>"""
        session = self.session
        request = parse_auth(
            arg,
            helo=bool(session.host_name),
            esmtp=session.extended_smtp,
            tls_missing=self._auth_require_tls and self._tls_protocol is None,
            authenticated=bool(session.authenticated),
            in_transaction=self.envelope.mail_from is not None,
        )
        if isinstance(request, str):
            SMTP._reply(self, request)
            return
        if self._limit_key is not None and not await self._auth_rate_allowed(self._limit_key):
            return
        if "AUTH" in self._hooks.hooks:
            status = await self._call_handler_hook("AUTH", request.args)
            if status is not MISSING:
                SMTP._reply(self, status)
                return
        method = self._auth_method(request.mechanism)
        if method is None:
            SMTP._reply(self, UNRECOGNIZED)
            return
        try:
            result = method(self, request.args)
            if inspect.isawaitable(result):
                result = await result
        except AuthAborted:
            return  # the reply is sent; only a credential check counts as a failure
        if result is not None:  # (None: the mechanism answered the client itself)
            self._finish_auth(request.mechanism, auth_outcome(result))

    async def _auth_rate_allowed(self, key: str) -> bool:
        """The client's AUTH-failure allowance (``limiter``): False after replying 454."""
        limiter: ClientLimiter = self._limiter
        if not limiter.counts_auth:
            return True
        allowed = limiter.auth_allowed(key)
        if allowed is True or (allowed is not False and await allowed):
            return True
        return self._rate_refused("auth", key)

    def _auth_method(self, name: str) -> Any:
        """The mechanism's method: the handler's ``auth_<NAME>``, else this class's."""
        if name in self._auth_exclude_mechanism:
            return None
        handler_method = self._hooks.auth_mechanisms.get(name)
        if handler_method is not None:
            return handler_method
        method_name = server_mechanisms(type(self)).get(name)
        return None if method_name is None else getattr(self, method_name)

    def _finish_auth(self, mechanism: str, outcome: AuthOutcome) -> None:
        """Apply a mechanism's outcome: authenticate, or count a failure (the last: 421)."""
        session = self.session
        if self.stats is not None:
            self.stats.auth["success" if outcome.success else "failure"] += 1
        if outcome.success:
            if self._limit_key is not None and self._limiter.counts_auth:
                self._limiter.auth_succeeded(self._limit_key)
            session.authenticated = True
            session.auth_data = outcome.auth_data
            session.login_data = outcome.login_data
            SMTP._reply(self, outcome.message or AUTH_OK)
            log.info("session=%s authenticated with %s", session.id, mechanism)
            return
        closes = count_failure(self._state, self._auth_failure_limit)
        log.info(
            "session=%s AUTH %s failed (%d of %d)",
            session.id,
            mechanism,
            self._state.auth_failures,
            self._auth_failure_limit,
        )
        if not outcome.handled:
            SMTP._reply(self, outcome.message or AUTH_FAILED)
        if closes:
            SMTP._reply(self, TOO_MANY_FAILURES)
            self._state.close_after_flush = True

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> Any:
        """Send a ``334`` challenge and return the client's decoded response (aiosmtpd API).

        Returns :data:`MISSING` after replying, when the client aborts or sends bad base64.
        ``log_client_response=True`` warns as aiosmtpd does, but farm still never logs the
        response: it may be a secret.
        """
        try:
            return await sasl_challenge(self, challenge, encode_to_b64, log_client_response)
        except AuthAborted:
            return MISSING

    async def _authenticate(self, mechanism: str, credentials: LoginPassword) -> AuthResult:
        """Check credentials with the ``authenticator`` (or ``auth_callback``)."""
        return await check_credentials(
            self._authenticator,
            self._auth_callback,
            self,
            self.session,
            self.envelope,
            mechanism,
            credentials,
        )

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:
        """RFC 4616 PLAIN: ``AUTH PLAIN [initial-response]``."""
        return await self._authenticate("PLAIN", await plain_exchange(self, args))

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        """The LOGIN mechanism: user name and password, each asked for (or given at once)."""
        credentials = await login_exchange(
            self, args, self.AuthLoginUsernameChallenge, self.AuthLoginPasswordChallenge
        )
        return await self._authenticate("LOGIN", credentials)

    # -- STARTTLS (RFC 3207; the rules are farm.smtp.tls's) ----------------------------------

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """STARTTLS"""
        refusal = starttls_refusal(
            arg, self.tls_context is not None, self._tls_protocol is not None
        )
        if refusal is not None:
            SMTP._reply(self, refusal)
            return
        SMTP._reply(self, "220 Ready to start TLS")
        SMTP._flush(self, now=True)  # in the clear, before the handshake takes the transport
        discarded = self._framer.take_buffered()
        session = self.session
        if discarded:
            log.warning(
                "session=%s discarded %d octets sent after STARTTLS before the handshake",
                session.id,
                len(discarded),
            )
        self._state.in_tls_handshake = True
        try:
            transport = await self.loop.start_tls(
                self.transport,
                self,
                self.tls_context,
                server_side=True,
                ssl_handshake_timeout=self._tls_handshake_timeout,
            )
        except HANDSHAKE_ERRORS as error:
            log.info("session=%s TLS handshake failed: %s", session.id, failure_reason(error))
            if self.stats is not None:
                self.stats.tls["failed"] += 1
            if self.transport is not None:
                self.transport.abort()
            await self._report_tls_failure(error)
            # asyncio tells only the TLS layer that the connection is gone: end the session.
            self.connection_lost(error)
            return
        finally:
            self._state.in_tls_handshake = False
        if transport is None:  # the connection closed during the handshake
            self.connection_lost(None)
            return
        self.transport = transport
        if self.stats is not None:
            self.stats.tls["ok"] += 1
        self._tls_protocol = transport.get_extra_info("ssl_object")
        session.ssl = tls_session_info(transport)
        forget_before_tls(session)
        self._set_rset_state()
        hook = self._hooks.hooks.get("STARTTLS")
        if hook is not None:
            try:
                self._state.tls_handshake_okay = bool(hook(self, session, self.envelope))
            except Exception:
                log.exception("session=%s handle_STARTTLS failed", session.id)
                self._state.tls_handshake_okay = False
        SMTP._update_checks(self)
        log.info("session=%s TLS established: %s", session.id, session.ssl.get("version"))

    async def _report_tls_failure(self, error: BaseException) -> None:
        """Tell the handler's ``handle_exception`` (as aiosmtpd does); the connection is gone,
        so whatever it returns is not sent."""
        if self._hooks.handle_exception is None:
            return
        await self._handle_exception(setup_exception(error))


async def _resume(coro: Coroutine[Any, Any, None], waiting_for: Any) -> None:
    """Drive a coroutine that was started outside a task and suspended on ``waiting_for``,
    as a task would: once that future is done the coroutine reads its outcome itself; if this
    task is cancelled meanwhile, the future is cancelled and the coroutine sees that."""
    while True:
        if waiting_for is None:  # a bare yield (asyncio.sleep(0))
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                with contextlib.suppress(RuntimeError):  # it awaited again while cancelled
                    coro.close()
                raise
        else:
            waiting_for._asyncio_future_blocking = False  # as a task does on a yield
            try:
                await waiting_for
            except asyncio.CancelledError:
                if not waiting_for.cancelled():
                    # This task was cancelled after the future was done (a hung-hook timeout,
                    # say): the coroutine gets the cancellation, as it would in a task.
                    try:
                        waiting_for = coro.throw(asyncio.CancelledError())
                    except StopIteration:
                        return
                    continue
            except BaseException:
                pass  # it reads the outcome on resuming
        try:
            waiting_for = coro.send(None)
        except StopIteration:
            return


#: Per-connection handles whose starting value is a class attribute of :class:`SMTP`: a
#: protocol from :meth:`SMTP.protocol_factory` starts with them in its own ``__dict__``.
_CONNECTION_DEFAULTS = (
    "session",
    "envelope",
    "transport",
    "_read_view",
    "on_open",
    "on_close",
    "stats",
    "_tls_protocol",
    "_line_waiter",
    "_task",
    "_task_is_delivery",
    "_read_paused",
    "_timer",
    "_closed_waiter",
    "_greet_handle",
    "_limit_key",
    "_body",
    "_bdat_content",
    "_stages",
    "_proxy_parser",
    "_proxy_timer",
    "_error_limits",
    "_held",
    "_deferred",
)

#: Settings read per command that are class attributes (a subclass may change them): a
#: factory-built protocol has its class's values in its own ``__dict__`` too (CPython 3.11
#: does not specialise reading a class attribute through such an instance).
_CLASS_SETTINGS = ("_helo_required", "_size_limits", "command_size_limit", "local_part_limit")


@functools.lru_cache(maxsize=256)
def _task_verbs(cls: type, hooks: HookTable) -> frozenset[str]:
    """Verbs whose coroutine may suspend: it calls a present ``async`` hook, or a subclass
    wrote it. A hook written as a plain function runs inline (see :func:`_inline_hook`)."""
    verbs = set()
    for verb, method in _hook_verbs(cls).items():
        overridden = getattr(SMTP, "smtp_" + verb, None) is not method
        if (
            overridden
            or verb in SMTP._always_task
            or any(
                name in hooks.hooks and not _inline_hook(hooks.hooks[name])
                for name in SMTP._verb_hooks.get(verb, ())
            )
        ):
            verbs.add(verb)
    return frozenset(verbs)


def _inline_hook(hook: Any) -> bool:
    """True for a hook written as a plain function (``def``, not ``async def``; a farm
    extension): its command runs at once, without a task, like a command without a hook; an
    awaitable it returns runs in a task of its own (``_call_handler_hook``)."""
    function = getattr(hook, "__func__", hook)
    return inspect.isfunction(function) and not inspect.iscoroutinefunction(function)


def _call_limits(limit: int | dict[str, int] | None) -> tuple[dict[str, int] | None, int]:
    """``command_call_limit`` as (per-verb limits, the limit of every other verb)."""
    if limit is None:
        return None, CALL_LIMIT_DEFAULT
    if isinstance(limit, int) and not isinstance(limit, bool):
        return {}, limit
    if not isinstance(limit, dict):
        raise TypeError("command_call_limit must be int or Dict[str, int]")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in limit.values()):
        raise TypeError("All command_call_limit values must be int")
    limits = {k.upper(): v for k, v in limit.items()}
    return limits, limits.pop("*", CALL_LIMIT_DEFAULT)


_checked_tls_contexts: weakref.WeakSet[Any] = weakref.WeakSet()
_logged_warnings: set[str] = set()


def _log_once(text: str) -> None:
    """Log a configuration warning once per process (SMTP is built once per connection)."""
    if text not in _logged_warnings:
        _logged_warnings.add(text)
        log.warning(text)


def _check_tls_context(context: Any) -> None:
    """Warn (once per context) about settings that make clients fail the handshake."""
    try:
        if context in _checked_tls_contexts:
            return
        _checked_tls_contexts.add(context)
    except TypeError:  # not weak-referenceable: check every time
        pass
    if context.verify_mode not in (ssl.CERT_NONE, ssl.CERT_OPTIONAL):
        log.warning(
            "tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
            "this might cause client connection problems"
        )
    elif context.check_hostname:
        log.warning(
            "tls_context.check_hostname == True; this might cause client connection problems"
        )


@functools.lru_cache(maxsize=64)
def _ehlo_keywords(
    hostname: str,
    data_size_limit: int | None,
    decode_data: bool,
    smtputf8: bool,
    pipelining: bool,
    extensions: tuple[bool, bool, bool],
    starttls: bool,
    auth: tuple[str, ...] | None,
) -> tuple[str, ...]:
    lines = [f"250-{hostname}"]
    if data_size_limit:
        lines.append(f"250-SIZE {data_size_limit}")
    if not decode_data:
        lines.append("250-8BITMIME")
    if smtputf8:
        lines.append("250-SMTPUTF8")
    if pipelining:
        lines.append("250-PIPELINING")
    enhanced, chunking, dsn = extensions
    if enhanced:
        lines.append("250-ENHANCEDSTATUSCODES")
    if chunking:
        lines.append("250-CHUNKING")
    if dsn:
        lines.append("250-DSN")
    if starttls:
        lines.append("250-STARTTLS")
    if auth is not None:
        lines.append("250-AUTH " + " ".join(auth))
    return tuple(lines)
