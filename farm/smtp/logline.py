"""Log lines made of fields, safe against forging by the client.

A session's log lines carry values the client chose (its HELO name, its MAIL FROM address).
:func:`quote` makes such a value one unambiguous token: a plain printable-ASCII value without
spaces or quotes stays as it is, anything else goes between double quotes with ``\\``, ``"``
and every character that is not printable (CR, LF, NUL, U+2028, U+2029, U+0085, surrogates
from undecodable bytes...) escaped as ``\\xNN``/``\\uNNNN``/``\\UNNNNNNNN``. So a client can
neither add a field (``outcome=550`` after a space) nor start a new line.

:class:`Fields` is a log message (``logger.info(MessageLine(...))``): rendered as
``key=value`` text by ``str()`` (what any ``logging`` handler shows, only when a handler
formats it), and read field by field by the farm's JSON formatter (``farm.logs``). The two
lines of the engine (:class:`MessageLine`, :class:`SessionLine`) render with one f-string,
since they are written once per message and once per session.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from collections.abc import Callable
from typing import Any, Final

#: When logging was imported (its private ``_startTime``, which typeshed does not declare).
_LOGGING_STARTED: Final[float] = vars(logging)["_startTime"]

__all__ = [
    "Fields",
    "LineBatch",
    "MessageLine",
    "SessionLine",
    "escape",
    "handle_info",
    "log_fields",
    "log_info",
    "printable",
    "quote",
    "reaches_only",
    "set_direct_route",
]

#: Printable ASCII except space, ``"`` and ``\``: safe to log bare.
_BARE: Final = re.compile(r"[!#-\[\]-~]+").fullmatch


def _escaped_char(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char == '"':
        return '\\"'
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` with ``\\``, ``"`` and every unprintable character escaped."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(_escaped_char(char) for char in text)


def _unprintable_escaped(char: str) -> str:
    return char if char.isprintable() else _escaped_char(char)


def printable(text: str) -> str:
    """``text`` with only its unprintable characters escaped (a whole log message)."""
    if text.isprintable():
        return text
    return "".join(_unprintable_escaped(char) for char in text)


def quote(value: str) -> str:
    """A value from the client as one log token (see the module docstring)."""
    if _BARE(value):
        return value
    return f'"{escape(value)}"'


class Fields:
    """A log message of named fields, rendered as ``key=value`` text by ``str()``.

    Subclasses name the ``event`` and list the field ``names``; :meth:`fields` gives the
    values in that order (subclasses may derive them from what they were given, when the
    line is formatted rather than when it is logged). Strings the client chose are quoted
    with :func:`quote`, floats are durations (``0.002s``). The JSON formatter (``farm.logs``)
    reads :meth:`as_dict` instead. What a line holds must not change once it is logged.
    """

    __slots__ = ("values",)
    event = "fields"
    names: tuple[str, ...] = ()
    #: True when ``str()`` never holds an unprintable character (so a formatter need not
    #: look for one): every value that could hold one is quoted or escaped by ``__str__``.
    always_printable = False

    def __init__(self, *values: Any) -> None:
        self.values = values

    def fields(self) -> tuple[Any, ...]:
        return self.values

    def __str__(self) -> str:
        pairs = zip(self.names, self.fields(), strict=True)
        return " ".join([f"{key}={_text(value)}" for key, value in pairs if value is not None])

    def as_dict(self) -> dict[str, Any]:
        """The fields for the JSON format (``event`` first; ``None`` values left out)."""
        data: dict[str, Any] = {"event": self.event}
        for key, value in zip(self.names, self.fields(), strict=True):
            if value is not None:
                data[key] = value
        return data


class _StageFields(Fields):
    """A line whose last value is the stages' ``key=value`` text (``" spf=pass dkim=none"``,
    or ``""``): appended to the text line, and split into fields of their own for JSON."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        data = super().as_dict()
        for part in self.values[-1].split():
            key, _, value = part.partition("=")
            data.setdefault(key, value)  # a stage cannot overwrite the engine's fields
        return data


class MessageLine(_StageFields):
    """The line of one message: ``MessageLine(session, n, mail_from, rcpts, size, outcome,
    duration, checks)``; ``n`` numbers the session's messages, ``outcome`` is the reply
    code, ``checks`` the stages' text."""

    __slots__ = ()
    event = "message"
    always_printable = True
    names: tuple[str, ...] = (
        "session",
        "msg",
        "peer",
        "client",
        "from",
        "rcpts",
        "size",
        "outcome",
        "duration",
    )

    def fields(self) -> tuple[Any, ...]:
        session, n, sender, rcpts, size, outcome, duration, _ = self.values
        sid = session.id
        return (
            sid,
            f"{sid}.{n}",
            peer_text(session.peer),
            proxy_client(session),
            f"<{sender or ''}>",
            rcpts,
            size,
            outcome,
            duration,
        )

    def __str__(self) -> str:
        return MessageLine.text("", self.values)

    @staticmethod
    def text(prefix: str, values: tuple[Any, ...]) -> str:
        """``prefix`` followed by the text of the line of ``values`` (the writer formats a
        line logged with :func:`log_fields` with this, never building the line itself)."""
        # One f-string, the usual case of each field checked inline, the client's values
        # looked up in the caches of recent ones (twice per message), small counts and
        # durations from tables (_count, _seconds: compiled, direct calls).
        session, n, sender, rcpts, size, outcome, duration, checks = values
        sid = session.id
        peer = _peer_and_via(session)
        try:
            token = _senders[sender]
        except (KeyError, TypeError):
            token = _sender_token(sender)
        if outcome not in _words:
            outcome = _token(outcome)
        if checks and not checks.isprintable():
            checks = printable(checks)
        return (
            f"{prefix}session={sid} msg={sid}.{_count(n)} peer={peer} from={token} "
            f"rcpts={_count(rcpts)} size={size} outcome={outcome} "
            f"duration={_seconds(duration)}s{checks}"
        )


class SessionLine(_StageFields):
    """The line of one session, at its end: ``SessionLine(session, commands, accepted,
    rejected, bytes, end, duration, checks)``."""

    __slots__ = ()
    event = "session"
    always_printable = True
    names: tuple[str, ...] = (
        "session",
        "peer",
        "client",
        "helo",
        "commands",
        "accepted",
        "rejected",
        "bytes",
        "end",
        "duration",
    )

    def fields(self) -> tuple[Any, ...]:
        session, *counts, _ = self.values
        return (
            session.id,
            peer_text(session.peer),
            proxy_client(session),
            session.host_name or "",
            *counts,
        )

    def __str__(self) -> str:
        return SessionLine.text("", self.values)

    @staticmethod
    def text(prefix: str, values: tuple[Any, ...]) -> str:
        """As :meth:`MessageLine.text` (once per session)."""
        session, commands, accepted, rejected, size, end, duration, checks = values
        peer = _peer_and_via(session)
        helo = session.host_name
        try:
            token = _helos[helo]
        except (KeyError, TypeError):
            token = _helo_token(helo)
        if end not in _words:
            end = _token(end)
        if checks and not checks.isprintable():
            checks = printable(checks)
        return (
            f"{prefix}session={session.id} peer={peer} helo={token} "
            f"commands={_count(commands)} accepted={_count(accepted)} "
            f"rejected={_count(rejected)} bytes={size} "
            f"end={end} duration={_seconds(duration)}s{checks}"
        )


#: The texts of durations under a second by their milliseconds, ``"0.000"`` to ``"0.999"``
#: (the same as ``f"{seconds:.3f}"``, rounded to the nearest millisecond): looked up, not
#: formatted, on every line.
_MILLISECONDS: Final = tuple(f"0.{ms:03d}" for ms in range(1000))
#: The texts of the counts 0 to 999 (messages, recipients, commands of a session).
_COUNTS: Final = tuple(str(count) for count in range(1000))


def _seconds(duration: Any) -> str:
    """``f"{duration:.3f}"``, from :data:`_MILLISECONDS` under a second: CPython formats a
    float with ".3f" in ~2,000 instructions, the lookup costs a third of that."""
    ms = int(duration * 1000 + 0.5)
    return _MILLISECONDS[ms] if 0 <= ms < 1000 else f"{duration:.3f}"


def _count(count: Any) -> Any:
    """A count (never negative) as a line shows it: from :data:`_COUNTS` under 1000 (an int's
    ``str()`` costs ~700 instructions), else the int itself for the f-string."""
    return _COUNTS[count] if count < 1000 else count


#: Recent values from clients and their log tokens (peer host -> ``"host:"``, MAIL FROM
#: address -> ``"<address>"``, HELO name -> token): the same few recur from line to line, so
#: a line looks them up instead of checking and quoting them again. Each is emptied when it
#: reaches :data:`_CACHE_SIZE` entries, and keeps no value longer than :data:`_CACHE_LONGEST`
#: (bounded memory whatever the clients send).
_hosts: Final[dict[Any, str]] = {}
_senders: Final[dict[Any, str]] = {}
_helos: Final[dict[Any, str]] = {}
#: Words the engine chose (reply codes, how sessions ended) seen to be log tokens as they are.
_words: Final[set[str]] = set()
_CACHE_SIZE: Final = 2048
_CACHE_LONGEST: Final = 256


def _remember(cache: dict[Any, str], key: str, token: str) -> str:
    if len(key) <= _CACHE_LONGEST:
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[key] = token
    return token


def _sender_token(sender: Any) -> str:
    """The ``from=`` token of a MAIL FROM address (None: the null sender ``<>``)."""
    token = f"<{sender or ''}>"
    if not _BARE(token):
        token = quote(token)
    return _remember(_senders, sender, token) if type(sender) is str else token


def _helo_token(helo: Any) -> str:
    """The ``helo=`` token of a HELO/EHLO name (None: none given)."""
    token = helo or ""
    if not _BARE(token):
        token = quote(token)
    return _remember(_helos, helo, token) if type(helo) is str else token


def peer_text(peer: Any) -> str:
    """A socket peer as ``host:port`` (``[v6]:port``), or its text (quoted if need be)."""
    if type(peer) is tuple and len(peer) >= 2:
        host = peer[0]
        if type(host) is str and _BARE(host):
            head = _remember(_hosts, host, f"[{host}]:" if ":" in host else f"{host}:")
            return f"{head}{peer[1]}"
    return quote(str(peer or "-"))


def _peer_and_via(session: Any) -> str:
    """The session's peer (its host's rendering from the cache of recent ones), then
    `` client=ADDRESS`` after a valid PROXY header; kept on the session (``log_peer``) for its
    next line: both are known before a session's first line, and never change."""
    text: str | None = getattr(session, "log_peer", None)
    if text is not None:
        return text
    peer = session.peer
    head = _hosts.get(peer[0]) if type(peer) is tuple and len(peer) >= 2 else None
    text = peer_text(peer) if head is None else f"{head}{peer[1]}"
    if getattr(session, "proxy_data", None) is not None:
        text += _via(session)
    try:  # noqa: SIM105 (contextlib.suppress would cost more than the rest of this function)
        session.log_peer = text
    except AttributeError:  # (a handler's own session class, with slots)
        pass
    return text


def _via(session: Any) -> str:
    """`` client=ADDRESS`` after a valid PROXY header, else nothing."""
    client = proxy_client(session)
    return "" if client is None else f" client={quote(client)}"


def _token(value: Any) -> str:
    """A value the engine chose (a reply code, how a session ended), as one token (a word
    is remembered in :data:`_words`)."""
    text = str(value)
    if not text.isalnum():
        return quote(text)
    if type(value) is str and len(value) <= 32:
        if len(_words) >= _CACHE_SIZE:
            _words.clear()
        _words.add(value)
    return text


def proxy_client(session: Any) -> str | None:
    """The client's address from a valid PROXY header (None without one)."""
    proxy = getattr(session, "proxy_data", None)
    if proxy is None or not getattr(proxy, "valid", False):
        return None
    return str(getattr(proxy, "src_addr", "-"))


def _text(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return quote(value)
    if kind is float:
        return f"{value:.3f}s"
    return str(value)


_LogRecord: Final = logging.LogRecord
_now: Final = time.time
_new_record: Final = _LogRecord.__new__
#: The attributes every record of :func:`log_fields` shares (what ``LogRecord()`` computes).
_RECORD_DEFAULTS: Final = dict(
    _LogRecord("", logging.INFO, "(unknown file)", 0, "", (), None).__dict__
)


_INFO: Final = logging.INFO
#: A handler that may take these lines straight, and how (see :func:`log_fields`).
_direct_handler: logging.Handler | None = None
_direct_emit: Callable[[logging.Logger, Any, float], None] = print


class LineBatch:
    """Lines queued for a writer that formats and writes them later, a batch at a time, and
    checks their route then (once per logger and batch, with :func:`reaches_only`).

    ``lines`` holds entries ``(time, logger, line, values)`` as :func:`log_fields` takes them
    (or anything the writer queues itself). Whoever queues the first line of a batch sets
    ``scheduled`` and calls ``begin()``, which has the batch written; the writer clears
    ``scheduled`` *before* it takes the lines, so a line queued meanwhile either goes with that
    batch or begins the next. Past ``limit`` lines, new ones are dropped and counted in
    ``dropped`` (a count to report, not exact under a race between threads). ``deque.append``
    needs no lock.
    """

    __slots__ = ("begin", "dropped", "limit", "lines", "scheduled")

    def __init__(self, begin: Callable[[], None], limit: int) -> None:
        self.lines: collections.deque[Any] = collections.deque()
        self.begin = begin
        self.limit = limit
        self.scheduled = False
        self.dropped = 0

    def add(self, entry: Any) -> None:
        """Queue ``entry`` (:func:`log_fields` does the same inline)."""
        lines = self.lines
        if len(lines) >= self.limit:
            self.dropped += 1
            return
        lines.append(entry)
        if not self.scheduled:
            self.scheduled = True
            self.begin()


#: The batch of the writer that takes the lines while it batches (None: not batching).
_batch: LineBatch | None = None


def set_direct_route(
    handler: logging.Handler | None, emit: Any = None, batch: LineBatch | None = None
) -> None:
    """Let :func:`log_fields` hand lines to ``emit(logger, message, time)`` whenever ``handler``
    is the only thing standard logging would give them to (None: never). ``batch``: the
    handler's :class:`LineBatch` while it batches; then lines are queued there as they are,
    and the handler checks their route when it writes them, handing those that would reach
    more (or another) to :func:`handle_info` (a line logged just before a handler is added
    elsewhere still reaches that handler, a batch later)."""
    global _direct_handler, _direct_emit, _batch
    _direct_handler, _direct_emit, _batch = None, print, None
    if handler is not None:
        _direct_emit = emit
        _batch = batch
        _direct_handler = handler


def log_fields(logger: logging.Logger, line: Any, values: tuple[Any, ...] | None) -> None:
    """``logger.info(line(*values))`` (``values`` None: ``logger.info(line)``), for the lines
    logged once per message or session; ``line`` is built only if it must be.

    Same outcome as ``logger.info``, with less work per line. While the farm's log writer
    batches and is the only handler the record would reach (``farm.logs`` registers it with
    :func:`set_direct_route`), the entry ``(time, logger, line, values)`` is queued on its
    :class:`LineBatch`: the writer formats it (``line.text(head, values)`` for the engine's
    lines) and checks the route when it writes the batch. Not batching, the line goes straight
    to the writer when it is the only handler (no filter on the way, nothing else attached);
    otherwise the record goes through ``logger.handle()`` like any other, but it is a copy of
    a prepared one with the time set, instead of one built by ``LogRecord.__init__`` (which
    also looks up the source file and thread each time). A custom record factory
    (``logging.setLogRecordFactory``) is honoured: then this is plain ``logger.info``.
    """
    if logger.disabled:
        return
    try:  # logger.isEnabledFor(INFO), from the logger's cache of its answers when it has one
        enabled = logger._cache[_INFO]  # type: ignore[attr-defined]
    except (AttributeError, KeyError):
        enabled = logger.isEnabledFor(_INFO)
    if not enabled:
        return
    batch = _batch
    if batch is not None:  # LineBatch.add, inline (twice per message)
        lines = batch.lines
        if len(lines) >= batch.limit:
            batch.dropped += 1
            return
        lines.append((_now(), logger, line, values))
        if not batch.scheduled:
            batch.scheduled = True
            batch.begin()
        return
    message = line if values is None else line(*values)
    handler = _direct_handler
    if handler is not None and reaches_only(logger, handler):
        _direct_emit(logger, message, _now())
        return
    if logging.getLogRecordFactory() is not _LogRecord or logging._srcfile:
        logger.info(message)  # (the caller's file and line looked up, as asked)
        return
    handle_info(logger, message, _now())


def log_info(logger: logging.Logger, message: Any) -> None:
    """``logger.info(message)``, as :func:`log_fields` logs it."""
    log_fields(logger, message, None)


def reaches_only(logger: logging.Logger, handler: logging.Handler) -> bool:
    """Whether an INFO record of ``logger`` would reach ``handler`` and nothing else: no
    filter, handler or disabled logger on the way, the handler alone on the root, below INFO.
    """
    if logger.filters or logger.handlers or not logger.propagate:
        return False
    # (One place per kind of logger that reads their attributes, the logger itself, the ones
    # in between, the root, so that each place stays specialised for its kind.)
    node: Any = logger.parent
    while node is not None and node.parent is not None:
        if node.filters or node.disabled or node.handlers or not node.propagate:
            return False
        node = node.parent
    if node is None:
        return False
    handlers = node.handlers
    return (
        len(handlers) == 1
        and handlers[0] is handler
        and not (node.filters or node.disabled or handler.filters)
        and handler.level <= _INFO
    )


def handle_info(logger: logging.Logger, message: Any, created: float) -> None:
    """An INFO record of ``message`` logged at ``created``, through ``logger.handle()`` (its
    filters and every handler it reaches), built as :func:`log_fields` says."""
    if logging.getLogRecordFactory() is not _LogRecord:  # (a custom factory makes it)
        record = logger.makeRecord(logger.name, _INFO, "(unknown file)", 0, message, (), None)
        attributes = record.__dict__
    else:
        record = _new_record(_LogRecord)
        attributes = record.__dict__
        attributes.update(_RECORD_DEFAULTS)
        attributes["name"] = logger.name
        attributes["msg"] = message
    attributes["created"] = created
    attributes["msecs"] = (created - int(created)) * 1000
    attributes["relativeCreated"] = (created - _LOGGING_STARTED) * 1000
    logger.handle(record)
