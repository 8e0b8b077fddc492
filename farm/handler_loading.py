"""Load the configured handler: ``module:attr``, instantiated with the configured arguments."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from farm.smtp import SMTP


class HandlerLoadError(Exception):
    """The handler could not be imported or built; the message is one clear line."""


def load_handler(spec: str, arguments: Mapping[str, Any] | None = None) -> Any:
    """``"pkg.mod:Name"`` -> a handler. A class is called with ``arguments``; an object is used."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerLoadError(f"bad handler {spec!r}: expected MODULE:ATTR")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise HandlerLoadError(
            f"cannot import handler module {module_name!r}: {type(error).__name__}: {error}"
        ) from None
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise HandlerLoadError(
            f"handler module {module_name!r} has no attribute {attr!r}"
        ) from None
    if isinstance(target, type):
        try:
            return target(**dict(arguments or {}))
        except Exception as error:
            raise HandlerLoadError(
                f"cannot create handler {spec}: {type(error).__name__}: {error}"
            ) from None
    if arguments:
        raise HandlerLoadError(f"handler {spec} is not a class: handler_args cannot apply")
    return target


def engine_factory(spec: str, handler: Any, **smtp_kwargs: Any) -> Callable[[], SMTP]:
    """The engine's protocol factory for ``handler`` (loaded from ``spec``): the engine checks
    the handler's hooks as it builds it, so a handler it refuses (an EHLO hook of an unknown
    signature...) is a :class:`HandlerLoadError` here, not a client left without a greeting."""
    try:
        return SMTP.protocol_factory(handler, **smtp_kwargs)
    except Exception as error:
        raise HandlerLoadError(
            f"handler {spec} refused by the engine: {type(error).__name__}: {error}"
        ) from None


def check_handler(spec: str, arguments: Mapping[str, Any] | None, **smtp_kwargs: Any) -> None:
    """Load the handler and build the engine's factory for it, as a worker's boot does (so the
    handler's constructor runs), serving nothing: a :class:`HandlerLoadError` if a worker could
    not boot with it (``farm check --load-handler``)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # (the worker's is current when its handler is built)
    try:
        engine_factory(spec, load_handler(spec, arguments), loop=loop, **smtp_kwargs)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
