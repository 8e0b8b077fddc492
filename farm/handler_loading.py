"""Load the configured handler: ``module:attr``, instantiated with the configured arguments."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


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
