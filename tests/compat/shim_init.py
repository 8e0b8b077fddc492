"""aiosmtpd, as farm: the package aiosmtpd's own tests import during ``make compat``.

``tests/compat/run.py`` copies this file to ``build/compat/aiosmtpd/__init__.py``, next to the
test files of aiosmtpd's wheel. Each submodule (``aiosmtpd.smtp`` ...) is a view of farm's
module: reading, setting or deleting an attribute through it (as ``mock.patch`` does) acts on
farm's module itself, so a test patches the code that runs. A private aiosmtpd name that farm
has no counterpart for (``_FakeServer``...) resolves to a placeholder that fails any test using
it; such tests are listed in ``tests/compat/exclusions.txt``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import farm

#: aiosmtpd's modules and the farm modules that stand in for them.
SUBMODULES = {
    "smtp": "farm.smtp",
    "controller": "farm.controller",
    "handlers": "farm.handlers",
    "lmtp": "farm.lmtp",
    "proxy_protocol": "farm.smtp.proxy_header",
    "main": "farm.main",
}

__version__ = farm.__version__


class PrivateName:
    """Stands for a private aiosmtpd name farm does not have: any use fails the test."""

    def __init__(self, qualname: str) -> None:
        self._qualname = qualname

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{self._qualname} is private to aiosmtpd; farm has none")

    __call__ = _fail

    def __getattr__(self, name: str) -> Any:
        self._fail()

    def __repr__(self) -> str:
        return f"<aiosmtpd private name {self._qualname}: not in farm>"


def _private(module: str, name: str) -> PrivateName:
    if name.startswith("_") and not name.startswith("__"):
        return PrivateName(f"{module}.{name}")
    raise AttributeError(f"module {module!r} (farm) has no attribute {name!r}")


class ModuleView(types.ModuleType):
    """``aiosmtpd.X`` as seen by the tests: every attribute lives in farm's module."""

    def __init__(self, name: str, target: types.ModuleType) -> None:
        super().__init__(name, target.__doc__)
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "__file__", getattr(target, "__file__", None))

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._target, name)
        except AttributeError:
            return _private(self.__name__, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._target, name)

    def __dir__(self) -> list[str]:
        return dir(self._target)


for _name, _target in SUBMODULES.items():
    _view = ModuleView(f"{__name__}.{_name}", importlib.import_module(_target))
    sys.modules[_view.__name__] = _view
    globals()[_name] = _view


def __getattr__(name: str) -> Any:
    return _private(__name__, name)
