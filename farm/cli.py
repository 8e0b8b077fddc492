"""The ``farm`` command: parse arguments and hand over to the server runner."""

from __future__ import annotations

import argparse
import logging
import sys

from farm import __version__
from farm.serve import ServeOptions, load_handler, parse_bind, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm", description="farm: an SMTP server farm")
    parser.add_argument("--version", action="version", version=f"farm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="serve SMTP on one event loop")
    run.add_argument("-b", "--bind", default="127.0.0.1:8025", help="HOST:PORT or [IPv6]:PORT")
    run.add_argument(
        "--handler", default="farm.handlers:Debugging", help="MODULE:ATTR of the handler"
    )
    run.add_argument("--hostname", default=None, help="name in the greeting (default: FQDN)")
    run.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument("--graceful-timeout", type=float, default=30.0)
    run.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        host, port = parse_bind(args.bind)
        handler = load_handler(args.handler)
    except ValueError as error:
        print(f"farm: {error}", file=sys.stderr)
        return 2
    options = ServeOptions(
        host=host,
        port=port,
        handler=handler,
        hostname=args.hostname,
        use_uvloop=args.uvloop,
        graceful_timeout=args.graceful_timeout,
    )
    return serve(options)
