"""[screening] and [authentication] in farm.toml: defaults (off), one-line errors, the round trip
through ``farm check``, and the stages a worker builds from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.authentication import AuthenticationStage
from farm.config import Config, ConfigError, load_config
from farm.pipeline import build_stages
from farm.screening.stage import DroppingScreening, EnforcingScreening


def test_both_are_off_by_default() -> None:
    config = Config()
    assert not config.screening.active and not config.authentication.active
    assert build_stages(config) == []


def test_a_full_configuration_round_trips(tmp_path: Path) -> None:
    config = Config(
        smtp={"hostname": "mx1.example.com"},
        screening={
            "resolver": ["127.0.0.1:5353", "[::1]:53"],
            "dnsbl": ["zen.spamhaus.org=127.0.0.[2..11]*3", "bl.spamcop.net*2"],
            "dnswl": ["list.dnswl.org=127.0.[0..255].[1..3]*-5"],
            "threshold": 3,
            "action": "drop",
            "timeout": 1.5,
        },
        authentication={"spf": True, "dkim": True, "arc": True, "dmarc": "enforce"},
    )
    path = tmp_path / "farm.toml"
    path.write_text(config.describe())
    again = load_config(path)
    assert again.screening == config.screening
    assert again.authentication == config.authentication
    screening, authentication = build_stages(again)
    assert isinstance(screening, DroppingScreening)
    assert [site.weight for site in screening.sites] == [3, 2, -5]
    assert isinstance(authentication, AuthenticationStage)
    assert authentication.authserv_id == "mx1.example.com"  # [smtp] hostname
    enforce = again.replace(screening={"action": "enforce"})
    assert isinstance(build_stages(enforce)[0], EnforcingScreening)


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"screening": {"dnsbl": ["zen"]}}, "screening.dnsbl: 'zen': 'zen' is not a DNS list"),
        ({"screening": {"dnsbl": "zen.spamhaus.org"}}, "screening.dnsbl: expected a list"),
        ({"screening": {"dnswl": ["a.test=1.2.3"]}}, "screening.dnswl: 'a.test=1.2.3': the filter"),
        ({"screening": {"action": "block"}}, "screening.action: expected one of enforce, drop"),
        ({"screening": {"resolver": ["dns.example"]}}, "screening.resolver: expected a nameserver"),
        ({"screening": {"min_ttl": 90, "max_ttl": 60}}, "screening.min_ttl: more than max_ttl"),
        ({"screening": {"threshold": 0}}, "screening.threshold: expected an integer >= 1"),
        ({"authentication": {"dmarc": "enforce"}}, "authentication.dmarc: needs spf = true"),
        ({"authentication": {"dmarc": "yes"}}, "authentication.dmarc: expected one of off"),
        ({"authentication": {"spf_reject_fail": True}}, "spf_reject_fail: needs spf = true"),
        ({"authentication": {"dkim": "yes"}}, "authentication.dkim: expected true or false"),
        ({"authentication": {"spff": True}}, "unknown key 'authentication.spff' (did you mean"),
    ],
)
def test_bad_values_are_one_line_errors(
    tmp_path: Path, tables: dict[str, dict[str, object]], message: str
) -> None:
    path = tmp_path / "farm.toml"
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            rendered = str(value).lower() if isinstance(value, bool) else repr(value)
            lines.append(f"{key} = {rendered}".replace("'", '"'))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
