"""Per-client-IP limits across the farm: one :class:`farm.limits.Anvil` in the supervisor.

Workers ask over their channel (``{"t": "anvil", "op": ..., "ip": ..., "id": n}``) and the
supervisor answers ``{"t": "anvil", "id": n, "ok": bool}``; ``close`` and ``authfail`` are
one-way. The supervisor remembers which worker holds which sessions, so the sessions of a
worker that died are given back at once. A worker whose question is not answered within
``ANSWER_TIMEOUT`` lets the client in (an MX must not refuse mail because its own bookkeeping
is slow) and logs a warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from farm.limits import Anvil, ClientLimits, Limiter

log = logging.getLogger("farm.anvil")

ANSWER_TIMEOUT = 2.0
#: Seconds a one-way notice (a session closed) may wait to go out with other messages.
NOTICE_DELAY = 0.02
#: The most messages a worker leases for one client at a time.
MAX_LEASE = 8
#: At most one "no answer" warning per this many seconds.
WARN_INTERVAL = 10.0


class AnvilService:
    """The supervisor's side: the counters and which worker holds which sessions."""

    def __init__(self, limits: ClientLimits) -> None:
        self.anvil = Anvil(limits)
        self._held: dict[int, Counter[str]] = {}

    def update(self, limits: ClientLimits) -> None:
        self.anvil.update(limits)

    def handle(self, pid: int, message: dict[str, Any]) -> dict[str, Any] | None:
        """Apply one worker message; the answer to send back, if it asks a question."""
        op, key = message.get("op"), message.get("ip")
        if not isinstance(key, str):
            return None
        anvil = self.anvil
        granted = 0
        if op == "open":
            ok, _ = anvil.open_session(key)
            if ok:
                self._held.setdefault(pid, Counter())[key] += 1
                granted = anvil.take_messages(key, _count(message.get("lease")))
        elif op == "close":
            held = self._held.get(pid)
            if held and held[key] > 0:
                held[key] -= 1
                if not held[key]:
                    del held[key]
                anvil.close_session(key)
            anvil.return_messages(key, _count(message.get("back")))
            return None
        elif op == "msg":
            granted = anvil.take_messages(key, _count(message.get("n")) or 1)
            ok = granted > 0
        elif op == "auth":
            ok = anvil.take_auth(key)
        elif op == "authok":
            anvil.give_back_auth(key)
            return None
        else:
            return None
        return {"t": "anvil", "id": message.get("id"), "ok": ok, "granted": granted}

    def worker_gone(self, pid: int) -> None:
        """A worker exited: the sessions it held are over."""
        for key, count in (self._held.pop(pid, None) or {}).items():
            for _ in range(count):
                self.anvil.close_session(key)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


#: An answer: ``{"ok": bool, "granted": messages leased}``.
Answer = dict[str, Any]
_ALLOWED: Answer = {"ok": True, "granted": 0}


class ChannelLimiter(Limiter):
    """A worker's ``limiter``: the same questions, answered by the supervisor's Anvil.

    Messages are leased: a session's admission brings a few messages of its client's allowance
    along, and a MAIL beyond them asks for a few more at once; what the worker's sessions of
    that client did not use goes back when the last of them closes. So a client sending one
    message per connection costs one round trip per connection, and a long session one per
    ``lease`` messages, while the farm-wide total still never exceeds the limit.
    """

    def __init__(
        self,
        limits: ClientLimits,
        send: Callable[[list[dict[str, Any]]], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(limits)
        self._send_many = send
        self._loop = loop
        #: Messages queued in this loop iteration, written together (one system call).
        self._outgoing: list[dict[str, Any]] = []
        #: Questions asked: id -> (the answer's future, when to stop waiting, op, client).
        self._pending: dict[int, tuple[asyncio.Future[Answer], float, str, str]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._flush_soon = False
        self._flush_later: asyncio.TimerHandle | None = None
        self._next_id = 0
        self._warned_at = -WARN_INTERVAL
        limit = limits.messages_per_ip
        self.lease = max(1, min(MAX_LEASE, limit // 20)) if limit else 0
        #: This worker's sessions and unused leased messages, per client.
        self._sessions: Counter[str] = Counter()
        self._allowance: Counter[str] = Counter()

    def _send(self, message: dict[str, Any], urgent: bool = True) -> None:
        """Queue a message: a question goes out at the end of this loop turn, a notice (a
        session closed) with the next question or within NOTICE_DELAY, whichever comes first,
        which saves the supervisor a wake-up per connection."""
        self._outgoing.append(message)
        if urgent:
            if not self._flush_soon:
                self._flush_soon = True
                self._loop.call_soon(self._flush)
        elif self._flush_later is None and not self._flush_soon:
            self._flush_later = self._loop.call_later(NOTICE_DELAY, self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self._flush_later is not None:
            self._flush_later.cancel()
            self._flush_later = None
        outgoing, self._outgoing = self._outgoing, []
        if outgoing:
            self._send_many(outgoing)

    def on_answer(self, message: dict[str, Any]) -> None:
        """An answer from the supervisor (a late one is dropped)."""
        entry = self._pending.pop(message.get("id", -1), None)  # type: ignore[arg-type]
        if entry is None:
            return
        future, _, op, key = entry
        if not future.done():
            future.set_result(message)
        elif future.cancelled() and op == "open" and self._opened(message, key):
            self.close_session(key)  # the client left while we asked

    def _ask(self, op: str, key: str, **extra: Any) -> asyncio.Future[Answer]:
        self._next_id += 1
        future = self._loop.create_future()
        self._pending[self._next_id] = (future, self._loop.time() + ANSWER_TIMEOUT, op, key)
        self._send({"t": "anvil", "op": op, "ip": key, "id": self._next_id, **extra})
        if self._expiry is None:
            self._expiry = self._loop.call_later(ANSWER_TIMEOUT, self._expire)
        return future

    def _expire(self) -> None:
        """Questions unanswered for ANSWER_TIMEOUT are allowed (one timer for all of them)."""
        self._expiry = None
        now = self._loop.time()
        expired = [
            ident
            for ident, (future, deadline, op, _) in self._pending.items()
            if deadline <= now and not (op == "open" and future.cancelled())
        ]  # an "open" whose client left stays: a late yes must still be given back
        for ident in expired:
            future = self._pending.pop(ident)[0]
            if not future.done():
                future.set_result(_ALLOWED)
        if expired and now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            log.warning("no answer from the supervisor's anvil within %.0fs", ANSWER_TIMEOUT)
        waiting = [entry[1] for entry in self._pending.values() if not entry[0].done()]
        if waiting:
            self._expiry = self._loop.call_at(min(waiting), self._expire)

    async def open_session(self, key: str) -> bool:
        future = self._ask("open", key, lease=self.lease)
        try:
            answer = await future
        except asyncio.CancelledError:
            # The client left. If the answer had come already (same loop turn), give back
            # what it granted; if not, on_answer does when it comes.
            if future.done() and not future.cancelled() and self._opened(future.result(), key):
                self.close_session(key)
            raise
        return self._opened(answer, key)

    def _opened(self, answer: Answer, key: str) -> bool:
        if not answer.get("ok"):
            return False
        self._sessions[key] += 1
        self._allowance[key] += _count(answer.get("granted"))
        return True

    def close_session(self, key: str) -> None:
        message: dict[str, Any] = {"t": "anvil", "op": "close", "ip": key}
        self._sessions[key] -= 1
        if self._sessions[key] <= 0:
            del self._sessions[key]
            unused = self._allowance.pop(key, 0)
            if unused:
                message["back"] = unused
        self._send(message, urgent=False)

    async def count_message(self, key: str) -> bool:
        if self._allowance[key] > 0:
            self._allowance[key] -= 1
            return True
        answer = await self._ask("msg", key, n=self.lease)
        if not answer.get("ok"):
            return False
        granted = _count(answer.get("granted"))
        if granted > 1 and key in self._sessions:
            self._allowance[key] += granted - 1
        return True

    async def auth_allowed(self, key: str) -> bool:
        return bool((await self._ask("auth", key)).get("ok"))

    def auth_succeeded(self, key: str) -> None:
        self._send({"t": "anvil", "op": "authok", "ip": key}, urgent=False)
