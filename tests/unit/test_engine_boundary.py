"""The engine (farm/smtp/) imports nothing from farm outside farm/smtp/ (but farm.__version__).

Read from the modules' syntax trees, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import farm.smtp

ENGINE = Path(farm.smtp.__file__).parent
MODULES = sorted(ENGINE.glob("*.py"))


def _farm_imports(tree: ast.AST) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) of every absolute import of a ``farm`` module in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, ()) for a in node.names if a.name.split(".")[0] == "farm"]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.split(".")[0] == "farm"
        ):
            found.append((node.module, tuple(a.name for a in node.names)))
    return found


def _allowed(module: str, names: tuple[str, ...]) -> bool:
    if module == "farm.smtp" or module.startswith("farm.smtp."):
        return True
    return module == "farm" and names == ("__version__",)


def test_there_are_engine_modules() -> None:
    assert {p.name for p in MODULES} >= {"server.py", "settings.py", "proxy_header.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_engine_module_imports_only_the_engine(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    outside = [(m, n) for m, n in _farm_imports(tree) if not _allowed(m, n)]
    assert outside == [], f"{path.name} imports from outside farm/smtp/: {outside}"


def test_the_check_sees_an_upward_import() -> None:
    tree = ast.parse("def f():\n    from farm.limits import session_key\nimport farm.config\n")
    outside = sorted(m for m, n in _farm_imports(tree) if not _allowed(m, n))
    assert outside == ["farm.config", "farm.limits"]
