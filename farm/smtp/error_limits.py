"""Per-session error limits, as Postfix's smtpd has them (``smtpd_soft_error_limit``,
``smtpd_hard_error_limit``, ``smtpd_junk_command_limit``, ``smtpd_error_sleep_time``).

An *error* is a command whose reply is a 4xx or 5xx (one per command, however many reply lines
it has): a syntax error, an unknown command, a refused sender or recipient (a directory-harvest
attempt is a run of refused recipients), a failed AUTH, a refused message. A ``452`` (too many
recipients, or "send this one in another transaction") is flow control, not an error: it counts
as a junk command. Junk commands (``NOOP``, ``VRFY``, ``RSET``, ``HELO``, ``EHLO``, ``HELP``)
are free up to ``junk_command_limit``; each one after that counts as an error.

* Past ``soft_error_limit`` errors every reply is delayed, by ``error_sleep_time`` seconds times
  the number of errors over the limit (at most :data:`ERROR_DELAY_MAX`). The delay is a timer:
  the event loop serves other sessions meanwhile, and this session's input waits unread.
* At ``hard_error_limit`` errors the session gets ``421 4.7.0 <host> Error: too many errors``
  and is closed.
* A message accepted (a 2xx after DATA or BDAT LAST) forgives the errors and junk commands so
  far, as Postfix does.

0 switches a limit off (the engine's default, as in aiosmtpd; the farm's ``[smtp]`` table turns
them on with Postfix's defaults: 10, 20, 100 and 1 s).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("farm.smtp")

#: The longest delay given to one reply, in seconds.
ERROR_DELAY_MAX = 10.0
#: Commands that cost the client nothing and can hold a session: free up to the junk limit.
JUNK_COMMANDS = frozenset({"NOOP", "VRFY", "RSET", "HELO", "EHLO", "HELP"})


def check_limit(name: str, value: Any) -> int:
    """An error-limit keyword: an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
    return value


class ErrorLimitMixin:
    """Error counting for :class:`farm.smtp.SMTP`: ``_count_reply`` sees every reply,
    ``_count_junk`` every junk command; ``_error_delay`` asks the input loop for a pause."""

    hostname: str
    _soft_error_limit = 0
    _hard_error_limit = 0
    _junk_command_limit = 0
    _error_sleep_time = 1.0
    #: Whether any limit is on (the reply path checks only this).
    _error_limits = False
    _errors = 0
    _junk = 0
    #: The command (``_n_commands``) that last counted an error: one error per command.
    _error_at = -1
    #: Seconds the next replies wait before they are sent (set past the soft limit).
    _error_delay = 0.0
    #: Replies are held while an error delay runs.
    _held = False

    def _set_error_limits(
        self, soft: int, hard: int, junk: int, sleep_time: float | int | None
    ) -> None:
        self._soft_error_limit = check_limit("soft_error_limit", soft)
        self._hard_error_limit = check_limit("hard_error_limit", hard)
        self._junk_command_limit = check_limit("junk_command_limit", junk)
        sleep_time = 0.0 if sleep_time is None else float(sleep_time)
        if not sleep_time >= 0:
            raise ValueError(f"error_sleep_time must be a number >= 0, not {sleep_time!r}")
        self._error_sleep_time = sleep_time
        self._error_limits = bool(soft or hard or junk)

    def _count_reply(self, text: str) -> None:
        """A reply is being queued: count it if it is an error (called when limits are on)."""
        server: Any = self
        if server._close_after_flush:
            return
        code = text[:3]
        if code == "452":
            self._count_junk()
        elif code[:1] in ("4", "5") and code != "421":
            self._count_error()
        if self._soft_error_limit and self._errors > self._soft_error_limit:
            over = self._errors - self._soft_error_limit
            self._error_delay = min(self._error_sleep_time * over, ERROR_DELAY_MAX)

    def _count_junk(self, verb: str | None = None) -> bool:
        """A junk command (or a 452): True when it hit the hard limit (the session is over)."""
        if not self._junk_command_limit:
            return False
        self._junk += 1
        if self._junk > self._junk_command_limit:
            return self._count_error()
        return False

    def _count_error(self) -> bool:
        """One more error for the current command: True when it hit the hard limit."""
        server: Any = self
        if self._error_at == server._n_commands:
            return False
        self._error_at = server._n_commands
        self._errors += 1
        if not self._hard_error_limit or self._errors < self._hard_error_limit:
            return False
        log.info("session=%s too many errors (%d): closing", server.session.id, self._errors)
        server._ended_how = "error"
        server._close_after_flush = True
        self._error_delay = 0.0
        server._reply(f"421 4.7.0 {self.hostname} Error: too many errors")
        return True

    def _forgive_errors(self) -> None:
        """A message was accepted: errors and junk commands start again from zero."""
        self._errors = self._junk = 0
        self._error_delay = 0.0

    def _pause_for_errors(self) -> None:
        """Hold the replies so far for ``_error_delay`` seconds; no input is handled meanwhile."""
        server: Any = self
        delay, self._error_delay = self._error_delay, 0.0
        if server._timeout:
            delay = min(delay, server._timeout / 2)  # never taken for a hung hook
        self._held = True
        server._run(self._error_pause(delay))

    async def _error_pause(self, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._held = False
