"""``both_loops``: a test module that imports it runs every engine test on plain asyncio and on
uvloop (the farm's production loop). It overrides conftest's ``loop_kind`` fixture."""

from __future__ import annotations

import pytest


@pytest.fixture(name="loop_kind", params=["asyncio", "uvloop"])
def both_loops(request: pytest.FixtureRequest) -> str:
    return request.param
