"""The command-sequence rules and the per-connection state (farm.smtp.state), without a socket."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import ModuleType

import pytest

import farm.smtp.deadlines
import farm.smtp.mail_rcpt
import farm.smtp.state
from farm.smtp.state import (
    HELO_FIRST,
    NEED_MAIL,
    NEED_RCPT,
    ConnectionState,
    Phase,
    ordering_refusal,
)

#: A session's place in a transaction, as (HELO name, sender, recipients) on record.
PHASES: dict[str, tuple[str | None, str | None, list[str]]] = {
    "before HELO": (None, None, []),
    "after HELO": ("client.test", None, []),
    "after MAIL": ("client.test", "a@b", []),
    "after RCPT": ("client.test", "a@b", ["c@d"]),
}
VERBS = ("MAIL", "RCPT", "DATA", "BDAT", "HELO", "EHLO", "RSET", "NOOP", "QUIT", "VRFY", "HELP")

#: phase -> {verb: reply}; a verb left out passes the ordering rules.
REFUSED = {
    "before HELO": {"MAIL": HELO_FIRST, "RCPT": HELO_FIRST, "DATA": HELO_FIRST, "BDAT": HELO_FIRST},
    "after HELO": {"RCPT": NEED_MAIL, "DATA": NEED_RCPT, "BDAT": NEED_RCPT},
    "after MAIL": {"DATA": NEED_RCPT, "BDAT": NEED_RCPT},
    "after RCPT": {},
}


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("phase", PHASES)
def test_phase_x_verb(phase: str, verb: str) -> None:
    assert ordering_refusal(verb, *PHASES[phase]) == REFUSED[phase].get(verb)


def test_the_replies_are_aiosmtpds() -> None:
    assert HELO_FIRST == "503 Error: send HELO first"
    assert NEED_MAIL == "503 Error: need MAIL command"
    assert NEED_RCPT == "503 Error: need RCPT command"


@pytest.mark.parametrize("verb", ["MAIL", "RCPT", "DATA", "BDAT"])
def test_lmtp_asks_for_its_own_greeting(verb: str) -> None:
    lhlo = "503 Error: send LHLO first"
    assert ordering_refusal(verb, None, None, [], lhlo) == lhlo


def test_helo_is_checked_before_the_transaction() -> None:
    # A sender without a HELO name (a handler set it): still "send HELO first".
    assert ordering_refusal("RCPT", "", "a@b", []) == HELO_FIRST
    assert ordering_refusal("DATA", None, "a@b", ["c@d"]) == HELO_FIRST


def test_recipients_alone_let_data_through() -> None:
    # aiosmtpd checks DATA against the recipients only (a handler may have set them).
    assert ordering_refusal("DATA", "client.test", None, ["c@d"]) is None


def test_the_null_sender_is_a_sender() -> None:
    assert ordering_refusal("RCPT", "client.test", "<>", []) is None


def test_connection_state_is_one_small_slotted_object() -> None:
    state = ConnectionState()
    assert not hasattr(state, "__dict__")
    # One pointer per field: the per-connection flags cost no more here than on the protocol.
    assert sys.getsizeof(state) <= 32 + 8 * len(ConnectionState.__slots__) <= 256
    assert state.phase is Phase.CONNECTED
    assert (state.commands, state.call_counts, state.write_paused) == (0, None, False)
    with pytest.raises(AttributeError):
        state.host_name = "x"  # type: ignore[attr-defined]


@pytest.mark.parametrize("module", [farm.smtp.state, farm.smtp.deadlines, farm.smtp.mail_rcpt])
def test_the_rules_are_sans_io(module: ModuleType) -> None:
    """No event loop, socket or clock: time comes in as ``now``."""
    # (its .py: a module the build compiles (farm/compiled.py) is imported from its .so)
    source = Path(str(module.__file__)).parent / f"{module.__name__.rpartition('.')[2]}.py"
    tree = ast.parse(source.read_text())
    imported = {
        alias.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import)
        for alias in n.names
    }
    imported |= {
        str(n.module).split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    }
    assert imported.isdisjoint({"asyncio", "socket", "ssl", "selectors", "uvloop", "time"})
