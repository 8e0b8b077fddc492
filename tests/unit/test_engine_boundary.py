"""The engine (farm/smtp/) imports nothing from farm outside farm/smtp/, and the modules the
protocol is built from (AUTH, STARTTLS, BDAT, PROXY, error limits) never import the protocol.

Read from the modules' syntax trees, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import farm
import farm.smtp
import farm.smtp.version

ENGINE = Path(farm.smtp.__file__).parent
MODULES = sorted(ENGINE.glob("*.py"))
#: Modules SMTP (farm/smtp/server.py) delegates to: they must not import it back.
LEAVES = ("sasl.py", "tls.py", "chunking.py", "proxy.py", "error_limits.py")


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
    return module == "farm.smtp" or module.startswith("farm.smtp.")


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


def test_the_check_sees_the_version_import() -> None:
    tree = ast.parse("from farm import __version__\n")
    assert [m for m, n in _farm_imports(tree) if not _allowed(m, n)] == ["farm"]


@pytest.mark.parametrize("name", LEAVES)
def test_protocol_parts_do_not_import_the_protocol(name: str) -> None:
    path = ENGINE / name
    imported = {m for m, _ in _farm_imports(ast.parse(path.read_text(), str(path)))}
    assert imported.isdisjoint({"farm.smtp", "farm.smtp.server"}), f"{name}: {imported}"


def test_the_farm_version_is_the_engines() -> None:
    assert farm.__version__ == farm.smtp.__version__ == farm.smtp.version.__version__
