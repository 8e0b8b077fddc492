"""``Counting`` behind a proxy: accepts every (valid, trusted) PROXY header.

The engine lets a session with a PROXY header go on only if the handler's ``handle_PROXY``
says so; ``Counting`` has none.
"""

from __future__ import annotations

from typing import Any

from tests.support.handlers.counting import Counting


class ProxiedCounting(Counting):
    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> bool:
        return True
