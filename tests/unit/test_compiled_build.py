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


def _third_party_imports(source: str) -> set[str]:
    import ast
    import sys

    tree = ast.parse((ROOT / source).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != "farm"}


@pytest.mark.parametrize("source", MODULES)
def test_module_imports_are_in_the_build_requirements(source: str) -> None:
    """The build type-checks each compiled module in pip's isolated build environment, which
    holds only ``[build-system] requires``: a library a compiled module imports must be there
    too, or a fresh install fails with "Cannot find implementation or library stub"."""
    import re
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    provided = {re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0] for requirement in requires}
    missing = _third_party_imports(source) - provided
    assert not missing, f"{source} imports {sorted(missing)}: add them to [build-system] requires"
