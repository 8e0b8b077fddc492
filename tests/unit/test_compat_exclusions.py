"""The exclusion list of ``make compat``: every line names a real aiosmtpd test and says why.

``make compat`` itself fails on a line that matches no test; this checks the file without
running aiosmtpd's suite, against the aiosmtpd wheel installed for the benchmark.
"""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

from tests.compat.run import AIOSMTPD_VERSION, REASON_KINDS, read_exclusions


def test_every_exclusion_has_a_kind_and_a_reason() -> None:
    exclusions = read_exclusions()
    assert exclusions
    for exclusion in exclusions:
        kind, _, why = exclusion.reason.partition(":")
        assert kind + ":" in REASON_KINDS
        assert len(why.strip()) > 20, exclusion.node
    nodes = [exclusion.node for exclusion in exclusions]
    assert len(nodes) == len(set(nodes))


def test_intentional_differences_stay_few() -> None:
    intentional = [e for e in read_exclusions() if e.reason.startswith("intentional:")]
    assert len(intentional) <= 20


def _names(path: Path) -> set[str]:
    """``Class::test`` and ``test`` names defined in one test file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test_"):
                    names.add(f"{node.name}::{item.name}")
        elif isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            names.add(node.name)
    return names


def test_every_exclusion_names_a_test_of_the_wheel() -> None:
    try:
        dist = importlib.metadata.distribution("aiosmtpd")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("aiosmtpd (the bench extra) is not installed in this environment")
    assert dist.version == AIOSMTPD_VERSION
    tests = Path(str(dist.locate_file("aiosmtpd"))) / "tests"
    for exclusion in read_exclusions():
        filename, _, name = exclusion.node.partition("::")
        assert (tests / filename).is_file(), exclusion.node
        assert name in _names(tests / filename), exclusion.node
