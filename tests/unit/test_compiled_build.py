"""The modules of farm/compiled.py run compiled, as the build leaves them, and never stale."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

import farm
from farm.compiled import MODULES

ROOT = Path(farm.__file__).resolve().parent.parent


def _module_name(source: str) -> str:
    return source.removesuffix(".py").replace("/", ".")


@pytest.mark.parametrize("source", MODULES)
def test_module_runs_compiled_and_current(source: str) -> None:
    module = importlib.import_module(_module_name(source))
    loaded = Path(str(module.__file__))
    if os.environ.get("FARM_PURE_PYTHON"):
        assert loaded.suffix == ".py"
        return
    assert loaded.suffix == ".so", f"{source} is not compiled: build with `make build`"
    # An extension module is imported before the .py beside it: an edit not rebuilt is ignored.
    assert loaded.stat().st_mtime >= (ROOT / source).stat().st_mtime, (
        f"{loaded.name} is older than {source}: rebuild with `make build`"
    )


@pytest.mark.parametrize("source", MODULES)
def test_module_is_type_checked_strictly(source: str) -> None:
    """``make lint``'s mypy (strict) covers every compiled module: pyproject's ``files`` list is
    kept by hand beside farm/compiled.py's."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True
    assert any(source == entry or source.startswith(entry + "/") for entry in config["files"]), (
        f"{source} is compiled but not in [tool.mypy] files"
    )
