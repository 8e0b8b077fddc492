"""The ``[scan]`` table of farm.toml: defaults, checks, and the effective-configuration dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.config import ConfigError, ScanSettings, load_config


def load(tmp_path: Path, table: str) -> ScanSettings:
    path = tmp_path / "farm.toml"
    path.write_text("[scan]\n" + table)
    return load_config(path).scan


def test_defaults_scan_nothing() -> None:
    settings = ScanSettings()
    assert not settings.active
    assert (settings.timeout, settings.on_error, settings.max_size) == (30.0, "tempfail", 20971520)


def test_the_issue_example(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        'rspamd = "http://127.0.0.1:11333"\nmilters = ["inet:127.0.0.1:11332", "unix:/run/m"]\n'
        'timeout = 30\non_error = "accept"\nmax_size = 1000\n',
    )
    assert settings.active and settings.rspamd == "http://127.0.0.1:11333"
    assert settings.milters == ("inet:127.0.0.1:11332", "unix:/run/m")
    assert (settings.timeout, settings.on_error, settings.max_size) == (30.0, "accept", 1000)
    config = load_config(tmp_path / "farm.toml")
    (tmp_path / "again.toml").write_text(config.describe())
    assert load_config(tmp_path / "again.toml") == config


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('rspamd = "127.0.0.1:11333"', "scan.rspamd: expected an URL"),
        ('rspamd = "https://x/checkv2"', "scan.rspamd: expected an URL"),
        ('milters = "inet:127.0.0.1:1"', "scan.milters: expected a list"),
        ('milters = ["tcp:127.0.0.1:1"]', "unknown milter transport 'tcp'"),
        ('milters = ["inet:127.0.0.1"]', "expected inet:HOST:PORT"),
        ('on_error = "reject"', 'scan.on_error: expected "tempfail" or "accept"'),
        ("timeout = 0", "scan.timeout: expected a number > 0"),
        ("max_size = 0", "scan.max_size: expected an integer >= 1"),
        ("milter = []", "unknown key 'scan.milter' (did you mean 'scan.milters'?)"),
    ],
)
def test_bad_values_are_refused_by_name(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"farm\.toml: ") as raised:
        load(tmp_path, table + "\n")
    assert message in str(raised.value)
