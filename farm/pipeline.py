"""The checks a farm worker runs around its handler, built from ``farm.toml``: the engine's
stages (``farm.smtp.stages``), in order: screening (``[screening]``), sender authentication
(``[authentication]``), then content scanning (``[scan]``), after authentication so that the
scanners see our Authentication-Results header.
"""

from __future__ import annotations

from typing import Any

from farm.authentication import AuthenticationStage
from farm.limits import ClientLimits
from farm.resolver import Resolver
from farm.scan.stage import ScanStage
from farm.screening import cache as verdict_cache
from farm.screening import parse_site, screening_stage
from farm.smtp.server import default_hostname
from farm.smtp.stages import Stage

__all__ = ["build_stages", "prepare_shared_state"]


def prepare_shared_state(config: Any) -> None:
    """In the supervisor, before forking: the farm-wide screening verdict cache."""
    if config.screening.active:
        verdict_cache.prepare(config.screening.cache_size)


def build_stages(config: Any, stats: Any = None) -> list[Stage]:
    """The stages of ``config`` (empty when no table turns a check on)."""
    stages: list[Stage] = []
    screening = config.screening
    authentication = config.authentication
    exempt = ClientLimits(exempt_networks=config.limits.exempt_networks).exempt
    observe = stats.dns_time if stats is not None else None
    if screening.active:
        sites = [parse_site(entry, 1) for entry in screening.dnsbl]
        sites += [parse_site(entry, -1) for entry in screening.dnswl]
        stages.append(
            screening_stage(
                screening.action,
                sites,
                Resolver(screening.resolver, observe=observe),
                threshold=screening.threshold,
                timeout=screening.timeout,
                exempt=exempt,
                cache=verdict_cache.shared(),
                min_ttl=screening.min_ttl,
                max_ttl=screening.max_ttl,
                stats=stats,
            )
        )
    if authentication.active:
        nameservers = authentication.resolver or screening.resolver
        stages.append(
            AuthenticationStage(
                Resolver(nameservers, observe=observe),
                authentication.authserv_id or config.smtp.hostname or default_hostname(),
                spf=authentication.spf,
                dkim=authentication.dkim,
                arc=authentication.arc,
                dmarc=authentication.dmarc,
                spf_reject_fail=authentication.spf_reject_fail,
                timeout=authentication.timeout,
                threads=authentication.threads,
                exempt=exempt,
                stats=stats,
            )
        )
    if config.scan.active:
        hostname = config.smtp.hostname or default_hostname()
        stages.append(ScanStage(config.scan, hostname, stats))
    return stages
