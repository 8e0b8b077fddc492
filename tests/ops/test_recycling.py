"""Worker recycling (max_messages) and the per-worker session cap (max_sessions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ops.test_supervisor import counting_config
from tests.support.client import SMTPClient, send_message
from tests.support.farms import FarmRunner, delivered


def test_max_messages_recycles_the_worker_without_losing_mail(
    farms: FarmRunner, tmp_path: Path
) -> None:
    out = tmp_path / "delivered"
    config = counting_config(tmp_path / "farm.toml", out, max_messages=5)
    farm = farms.start(config=config, workers=1)
    first = farm.wait_ready(1)[0]
    for n in range(6):
        assert send_message(farm.port, f"r{n}@farm.test").startswith("250")
    # After its 5th message the worker asks to be replaced; the replacement takes over once
    # READY and the old worker exits with no session cut.
    farm.wait_log(rf"worker 0 gen 1 \(pid {first}\) exited \(recycle\)")
    for n in range(6, 9):
        assert send_message(farm.port, f"r{n}@farm.test").startswith("250")
    pids = [int(line.split()[0]) for line in delivered(out)]
    assert len(pids) == 9
    assert pids[:5] == [first] * 5
    assert first not in pids[6:], "the recycled worker still served after it exited"
    assert farm.metric("farm_worker_restarts_total", reason="recycle") >= 1
    assert farm.metric("farm_worker_restarts_total", reason="crash") == 0


def test_max_sessions_pauses_accepting_until_a_session_ends(
    farms: FarmRunner, tmp_path: Path
) -> None:
    out = tmp_path / "delivered"
    config = counting_config(tmp_path / "farm.toml", out, max_sessions=2)
    farm = farms.start(config=config, workers=1)
    farm.wait_ready(1)
    held = [SMTPClient(farm.port, timeout=10) for _ in range(2)]
    try:
        for client in held:
            assert client.reply().startswith("220 ")
        farm.wait_log(r"worker 0: 2 sessions, at the cap: not accepting")
        with SMTPClient(farm.port, timeout=1.0) as waiting:
            # Queued by the kernel, not served: the only worker is at its cap (1 s of silence
            # is the evidence; a greeting would come within milliseconds).
            with pytest.raises(TimeoutError):
                waiting.reply()
            held.pop().close()
            waiting.sock.settimeout(10)
            assert waiting.reply().startswith("220 ")
    finally:
        for client in held:
            client.close()
