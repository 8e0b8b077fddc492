"""The ``farm`` command: parse arguments, build the configuration, hand over. No logic here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from farm import __version__
from farm.config import Config, ConfigError, load_config
from farm.logs import configure_logging
from farm.supervisor.listeners import (
    ListenerError,
    bind_listeners,
    inherit_systemd_listeners,
)
from farm.supervisor.privileges import PrivilegeError, check_drop

log = logging.getLogger("farm")

#: Exit status for a bad command line or configuration.
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm", description="farm: an SMTP server farm")
    parser.add_argument("--version", action="version", version=f"farm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the supervisor and its workers")
    _add_config_flags(serve)
    check = commands.add_parser("check", help="validate and print the effective configuration")
    _add_config_flags(check)
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="TOML configuration file")
    parser.add_argument(
        "-b", "--bind", action="append", help="HOST:PORT, [IPv6]:PORT, unix:/path or fd://N"
    )
    parser.add_argument("-w", "--workers", type=int, help="worker processes (default: CPUs)")
    parser.add_argument("--handler", help="MODULE:ATTR of the handler")
    parser.add_argument("--metrics", help="HOST:PORT to serve Prometheus /metrics on")
    parser.add_argument("--user", help="user to run as after binding")
    parser.add_argument("--group", help="group to run as after binding")
    parser.add_argument("--pidfile", help="write the supervisor's pid here")
    parser.add_argument("--graceful-timeout", type=float, help="seconds a stop may drain")
    parser.add_argument("--stop-delay", type=float, help="seconds TERM serves on, /ready 503")
    parser.add_argument("--timeout", type=float, help="seconds without heartbeat = hung worker")
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-file", help="log here instead of stderr (SIGUSR1 reopens)")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line flags as configuration keys (None: not given)."""
    return {
        "bind": args.bind,
        "workers": args.workers,
        "handler": args.handler,
        "metrics": args.metrics,
        "user": args.user,
        "group": args.group,
        "pidfile": args.pidfile,
        "graceful_timeout": args.graceful_timeout,
        "stop_delay": args.stop_delay,
        "timeout": args.timeout,
        "uvloop": args.uvloop,
        "log_level": args.log_level,
        "log_file": args.log_file,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = overrides_from(args)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"farm: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        print(config.describe(), end="")
        return 0
    return serve(config, overrides)


def serve(config: Config, overrides: dict[str, Any]) -> int:
    """Bind (or inherit) the listeners, load the TLS key, and run the supervisor (whose workers
    drop privileges to ``user``/``group``)."""
    from farm.supervisor.arbiter import Arbiter

    try:
        check_drop(config.user, config.group)
        tls_context = config.smtp.tls_context()  # before any drop: a root-only key works
    except (PrivilegeError, ConfigError) as error:
        print(f"farm: {error}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_level, config.log_file)
    try:
        listeners = inherit_systemd_listeners()
        if listeners is None:
            listeners = bind_listeners(config.listen_addresses())
        else:
            log.info("using %d socket(s) passed by systemd", len(listeners))
    except ListenerError as error:
        print(f"farm: {error}", file=sys.stderr)
        return 1
    if config.pidfile:
        _write_pidfile(config.pidfile)
    where = ", ".join(listener.bound for listener in listeners)
    metrics = f", metrics on http://{config.metrics}/metrics" if config.metrics else ""
    print(
        f"farm: supervisor pid {os.getpid()}: SMTP on {where}{metrics}, "
        f"{config.workers} worker(s) (Ctrl-C or SIGTERM to stop)",
        file=sys.stderr,
        flush=True,
    )
    try:
        return Arbiter(config, listeners, overrides=overrides, tls_context=tls_context).run()
    finally:
        if config.pidfile:
            _remove_pidfile(config.pidfile)


def _write_pidfile(path: str) -> None:
    with open(path, "w") as pidfile:
        pidfile.write(f"{os.getpid()}\n")


def _remove_pidfile(path: str) -> None:
    try:
        with open(path) as pidfile:
            if pidfile.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass
