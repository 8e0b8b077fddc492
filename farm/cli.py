"""The ``farm`` command: parse arguments, build the configuration, hand over. No logic here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from farm import __version__
from farm.config import Config, ConfigError, load_config
from farm.logs import LogFileError, configure_logging
from farm.pidfile import PidfileError, write_pidfile
from farm.supervisor.listeners import (
    ListenerError,
    bind_listeners,
    inherit_systemd_listeners,
)
from farm.supervisor.privileges import (
    PrivilegeError,
    check_drop,
    resolve_group,
    resolve_user,
)

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
    check.add_argument(
        "--load-handler",
        action="store_true",
        help="also import and build the handler (its constructor runs) and check it against "
        "the engine, as a worker does when it boots",
    )
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
    parser.add_argument("--log-format", help="text (default) or json (one object per line)")


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
        "log_format": args.log_format,
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
        if args.load_handler:
            from farm.handler_loading import HandlerLoadError, check_handler

            try:
                check_handler(config.handler, config.handler_args, **config.smtp.as_kwargs())
            except (HandlerLoadError, ConfigError) as error:
                print(f"farm: {error}", file=sys.stderr)
                return EXIT_CONFIG
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
    try:
        # The log file is created for the workers' user: they reopen it at SIGUSR1.
        owner = resolve_user(config.user) if config.user is not None else None
        if owner is not None and config.group is not None:
            owner = (owner[0], resolve_group(config.group))
        configure_logging(config.log_level, config.log_file, config.log_format, owner)
    except (LogFileError, PrivilegeError) as error:
        print(f"farm: {error}", file=sys.stderr)
        return 1
    try:
        listeners = inherit_systemd_listeners()
        if listeners is None:
            listeners = bind_listeners(config.listen_addresses())
        else:
            log.info("using %d socket(s) passed by systemd", len(listeners))
    except ListenerError as error:
        print(f"farm: {error}", file=sys.stderr)
        return 1
    pidfile = None
    if config.pidfile:
        try:
            pidfile = write_pidfile(config.pidfile)
        except PidfileError as error:
            print(f"farm: {error}", file=sys.stderr)
            return 1
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
        if pidfile is not None:
            pidfile.remove()
