"""``python -m farm.main``: aiosmtpd's one-process command line, on farm's engine.

The options are aiosmtpd's (``-n -l HOST:PORT -c HANDLER -s SIZE -u -d --tlscert/--tlskey
--no-requiretls --smtpscert/--smtpskey``), so a service started as ``python -m aiosmtpd ...``
moves by changing the module name. For production, ``farm serve`` (the pre-forking farm) is the
command; this one serves a single event loop, as aiosmtpd does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import warnings
from argparse import ArgumentParser, Namespace
from collections.abc import Sequence
from functools import partial
from importlib import import_module
from pathlib import Path
from typing import Any

from farm import __version__
from farm.smtp import DATA_SIZE_DEFAULT, SMTP

try:
    import pwd
except ImportError:  # not a POSIX system
    pwd = None  # type: ignore[assignment]

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8025
DEFAULT_CLASS = "farm.handlers.Debugging"
#: The program name in usage and --version lines.
PROGRAM = "farm.main" if sys.argv[0].endswith("main.py") else os.path.basename(sys.argv[0])

#: The logger that ``-d`` turns up: the engine's and the handlers' (all of farm's).
log = logging.getLogger("farm")


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROGRAM, description="An RFC 5321 SMTP server (farm's engine).")
    add = parser.add_argument
    add("-v", "--version", action="version", version=f"%(prog)s {__version__}")
    add(
        "-n",
        "--nosetuid",
        dest="setuid",
        default=True,
        action="store_false",
        help="do not switch to the user 'nobody' (needed unless run as root)",
    )
    add(
        "-c",
        "--class",
        dest="classpath",
        metavar="CLASSPATH",
        default=DEFAULT_CLASS,
        help=f"handler class as a dotted path (default: {DEFAULT_CLASS})",
    )
    add(
        "-s",
        "--size",
        metavar="SIZE",
        type=int,
        help=f"largest message accepted, in octets (SIZE extension; default {DATA_SIZE_DEFAULT:,})",
    )
    add("-u", "--smtputf8", default=False, action="store_true", help="enable SMTPUTF8")
    add("-d", "--debug", default=0, action="count", help="more logging; repeat for more")
    add(
        "-l",
        "--listen",
        metavar="[HOST][:PORT]",
        nargs="?",
        default=None,
        help=f"where to listen (default {DEFAULT_HOST}:{DEFAULT_PORT}; either part may go)",
    )
    add("--smtpscert", metavar="CERTFILE", type=Path, help="certificate for implicit TLS")
    add("--smtpskey", metavar="KEYFILE", type=Path, help="key for implicit TLS")
    add("--tlscert", metavar="CERTFILE", type=Path, help="certificate for STARTTLS")
    add("--tlskey", metavar="KEYFILE", type=Path, help="key for STARTTLS")
    add(
        "--no-requiretls",
        dest="requiretls",
        default=True,
        action="store_false",
        help="with STARTTLS: do not require it before other commands",
    )
    add("classargs", metavar="CLASSARGS", nargs="*", default=(), help="arguments for the handler")
    return parser


def _listen_address(parser: ArgumentParser, listen: str | None) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` or ``:PORT`` (the last colon separates the port)."""
    if listen is None:
        return DEFAULT_HOST, DEFAULT_PORT
    host, colon, port = listen.rpartition(":")
    if not colon:
        return port, DEFAULT_PORT
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        parser.error(f"Invalid port number: {port}")
    return host or DEFAULT_HOST, number


def _check_pair(parser: ArgumentParser, kind: str, cert: Path | None, key: Path | None) -> None:
    if bool(cert) != bool(key):
        parser.error(f"--{kind}cert and --{kind}key must be specified together")
    if cert and not cert.exists():
        parser.error(f"Cert file {cert} not found")
    if key and not key.exists():
        parser.error(f"Key file {key} not found")


def parseargs(args: Sequence[str] | None = None) -> tuple[ArgumentParser, Namespace]:
    """Parse the command line and build the handler (``from_cli(parser, *args)`` if it has one)."""
    parser = _parser()
    parsed = parser.parse_args(args)
    module_name, _, class_name = parsed.classpath.rpartition(".")
    handler_class = getattr(import_module(module_name), class_name)
    if hasattr(handler_class, "from_cli"):
        parsed.handler = handler_class.from_cli(parser, *parsed.classargs)
    elif parsed.classargs:
        parser.error(f"Handler class {module_name} takes no arguments")
    else:
        parsed.handler = handler_class()
    parsed.host, parsed.port = _listen_address(parser, parsed.listen)
    _check_pair(parser, "smtps", parsed.smtpscert, parsed.smtpskey)
    _check_pair(parser, "tls", parsed.tlscert, parsed.tlskey)
    return parser, parsed


def _server_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if not (cert and key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.check_hostname = False
    context.load_cert_chain(str(cert), str(key))
    return context


def _drop_to_nobody() -> None:
    """Switch to the user ``nobody``; exit 1 with a one-line reason when that is impossible."""
    if pwd is None:
        print('Cannot import module "pwd"; try running with -n option.', file=sys.stderr)
        sys.exit(1)
    try:
        os.setuid(pwd.getpwnam("nobody").pw_uid)
    except PermissionError:
        print('Cannot setuid "nobody"; try running with -n option.', file=sys.stderr)
        sys.exit(1)


def _current_loop() -> asyncio.AbstractEventLoop:
    """The thread's event loop if one was set, else a new one (set as the current loop)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            loop = None
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
    return loop


def main(args: Sequence[str] | None = None) -> None:
    """Serve until SIGINT (or until the loop is stopped), then close the listener."""
    _, ns = parseargs(args)
    if ns.setuid:
        _drop_to_nobody()
    factory: Any = partial(
        SMTP,
        ns.handler,
        data_size_limit=DATA_SIZE_DEFAULT if ns.size is None else ns.size,
        enable_SMTPUTF8=ns.smtputf8,
        tls_context=_server_context(ns.tlscert, ns.tlskey),
        require_starttls=ns.requiretls,
    )
    logging.basicConfig(level=logging.ERROR)
    loop = _current_loop()
    if ns.debug > 0:
        log.setLevel(logging.INFO if ns.debug == 1 else logging.DEBUG)
    if ns.debug > 2:
        loop.set_debug(True)
    smtps = _server_context(ns.smtpscert, ns.smtpskey)
    server = loop.run_until_complete(
        loop.create_server(factory, host=ns.host, port=ns.port, ssl=smtps)
    )
    log.info("Server is listening on %s:%s", ns.host, ns.port)
    with contextlib.suppress(NotImplementedError):  # no signal handlers on this platform
        loop.add_signal_handler(signal.SIGINT, loop.stop)
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_forever()
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.close()


if __name__ == "__main__":
    main()
