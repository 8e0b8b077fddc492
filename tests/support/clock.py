"""A clock that moves only when a test moves it (``clock.now += 20``)."""

from __future__ import annotations


class FakeClock:
    """Callable like ``time.monotonic``; starts at 1000 s."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
