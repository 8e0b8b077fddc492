"""farm.smtp.settings is the one place an engine default is written."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from farm.config import SMTPSettings
from farm.smtp import SMTP
from farm.smtp.settings import DEFAULTS, EngineSettings

#: The [smtp] table's deliberate departures from the engine's (aiosmtpd's) defaults.
FARM_OVERRIDES = {
    "enable_SMTPUTF8": True,
    "strict_smtputf8": True,
    "forbid_unauth_pipelining": True,
    "pipelining": True,
    "enhanced_status_codes": True,
    "chunking": True,
    "soft_error_limit": 10,
    "hard_error_limit": 20,
    "junk_command_limit": 100,
}


def _smtp_keywords() -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(SMTP.__init__).parameters
    return {n: p for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_settings_hold_every_keyword_of_smtp() -> None:
    assert EngineSettings.names() == set(_smtp_keywords())


def test_smtp_signature_defaults_are_the_settings() -> None:
    for name, parameter in _smtp_keywords().items():
        assert parameter.default == getattr(DEFAULTS, name), name


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.timeout = 1.0  # type: ignore[misc]


def test_config_states_only_its_overrides() -> None:
    table = SMTPSettings()
    for name in set(SMTPSettings.names()) - {"tls_cert", "tls_key"}:
        expected = FARM_OVERRIDES.get(name, getattr(DEFAULTS, name))
        assert getattr(table, name) == expected, name
    for name, value in FARM_OVERRIDES.items():
        assert value != getattr(DEFAULTS, name), f"{name} is no override"


def test_keywords_build_a_session() -> None:
    session = SMTP(object(), **DEFAULTS.keywords())
    assert session.data_size_limit == DEFAULTS.data_size_limit
