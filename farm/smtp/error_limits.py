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

:class:`ErrorLimits` does the counting and the deciding, without I/O; the protocol holds one
per session (when a limit is on), sends the ``421`` and runs the delay.
"""

from __future__ import annotations

from typing import Any

#: The longest delay given to one reply, in seconds.
ERROR_DELAY_MAX = 10.0
#: Commands that cost the client nothing and can hold a session: free up to the junk limit.
JUNK_COMMANDS = frozenset({"NOOP", "VRFY", "RSET", "HELO", "EHLO", "HELP"})


def check_limit(name: str, value: Any) -> int:
    """An error-limit keyword: an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
    return value


def any_limit(soft: int, hard: int, junk: int) -> bool:
    """Whether a session needs an :class:`ErrorLimits` at all (0 switches a limit off)."""
    return bool(soft or hard or junk)


class ErrorLimits:
    """One session's errors and junk commands, and what they lead to.

    Commands are told apart by their number in the session (``command``): a command counts
    one error at most, however many error replies it gets.
    """

    __slots__ = ("delay", "error_at", "errors", "hard", "junk", "junk_limit", "sleep_time", "soft")

    def __init__(self, soft: int, hard: int, junk: int, sleep_time: float | None) -> None:
        self.soft = check_limit("soft_error_limit", soft)
        self.hard = check_limit("hard_error_limit", hard)
        self.junk_limit = check_limit("junk_command_limit", junk)
        sleep_time = 0.0 if sleep_time is None else float(sleep_time)
        if not sleep_time >= 0:
            raise ValueError(f"error_sleep_time must be a number >= 0, not {sleep_time!r}")
        self.sleep_time = sleep_time
        self.errors = 0
        self.junk = 0
        #: The command that last counted an error.
        self.error_at = -1
        #: Seconds the next replies wait before they are sent (set past the soft limit).
        self.delay = 0.0

    def fresh(self) -> ErrorLimits:
        """A new session's limits: these settings (checked once, here), no counts."""
        limits = ErrorLimits.__new__(ErrorLimits)
        limits.soft, limits.hard, limits.junk_limit = self.soft, self.hard, self.junk_limit
        limits.sleep_time = self.sleep_time
        limits.errors = limits.junk = 0
        limits.error_at = -1
        limits.delay = 0.0
        return limits

    def count_reply(self, text: str, command: int) -> bool:
        """A reply to ``command`` is being sent: True when it makes one error too many (the
        session must end with ``421``)."""
        code = text[:3]
        if code == "452":
            over = self.count_junk(command)
        elif code[:1] in ("4", "5") and code != "421":
            over = self.count_error(command)
        else:
            over = False
        if over:
            return True
        if self.soft and self.errors > self.soft:
            self.delay = min(self.sleep_time * (self.errors - self.soft), ERROR_DELAY_MAX)
        return False

    def count_junk(self, command: int) -> bool:
        """A junk command (or a 452): True when it hit the hard limit."""
        if not self.junk_limit:
            return False
        self.junk += 1
        if self.junk > self.junk_limit:
            return self.count_error(command)
        return False

    def count_error(self, command: int) -> bool:
        """An error reply to ``command``: True when it hit the hard limit."""
        if self.error_at == command:
            return False
        self.error_at = command
        self.errors += 1
        if not self.hard or self.errors < self.hard:
            return False
        self.delay = 0.0
        return True

    def forgive(self) -> None:
        """A message was accepted: errors and junk commands start again from zero."""
        self.errors = self.junk = 0
        self.delay = 0.0

    def take_delay(self) -> float:
        """The pause due before the next replies (then none until more errors)."""
        delay, self.delay = self.delay, 0.0
        return delay
