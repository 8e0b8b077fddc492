"""``make compat``: aiosmtpd 1.4.6's own test suite, run against farm.

Run with the interpreter of ``.venv-compat`` (aiosmtpd's wheel, pytest, pytest-mock and farm
installed there). The script

1. copies the test files aiosmtpd's wheel ships (``aiosmtpd/tests``, ``aiosmtpd/testing``)
   into ``build/compat/aiosmtpd/``, next to a generated ``aiosmtpd/__init__.py`` whose
   submodules *are* farm's modules (``aiosmtpd.smtp`` -> ``farm.smtp``, ...);
2. puts ``build/compat`` first on ``sys.path`` (so ``import aiosmtpd`` finds the shim, never
   the installed wheel) and runs the copied tests with pytest, leaving out the tests named in
   ``tests/compat/exclusions.txt``, each with its reason;
3. prints ``N passed, M excluded of T`` and exits non-zero unless every test that ran passed.

Nothing of aiosmtpd is copied into the repository: ``build/`` is ignored by git.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AIOSMTPD_VERSION = "1.4.6"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXCLUSIONS = HERE / "exclusions.txt"
SHIM_TEMPLATE = HERE / "shim_init.py"
#: Reasons an exclusion may give: a test of aiosmtpd's internals, or a difference we chose.
REASON_KINDS = ("private:", "intentional:")
#: Seconds one aiosmtpd test may take before it counts as failed (a hang).
TEST_TIMEOUT = 90

PYTEST_INI = """\
[pytest]
addopts = -p no:cacheprovider
timeout = {timeout}
markers =
    client_data: aiosmtpd's client fixture settings
    controller_data: aiosmtpd's controller fixture settings
    handler_data: aiosmtpd's handler fixture settings
"""


@dataclass
class Exclusion:
    """One line of the exclusion file: a test node id (or a prefix of one) and why."""

    node: str
    reason: str
    line: int
    matched: int = 0


def read_exclusions(path: Path = EXCLUSIONS) -> list[Exclusion]:
    """Parse ``node-id -- reason`` lines; blank lines and ``#`` comments are skipped.

    A node id names a test, every parametrisation of it (no ``[...]``) or a whole class.
    """
    exclusions = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        node, sep, reason = text.partition(" -- ")
        node, reason = node.strip(), reason.strip()
        if not sep or not node or not reason:
            raise SystemExit(f"{path}:{number}: expected 'test-id -- reason', got {raw!r}")
        if not reason.startswith(REASON_KINDS):
            raise SystemExit(
                f"{path}:{number}: the reason must start with one of {', '.join(REASON_KINDS)}"
            )
        exclusions.append(Exclusion(node, reason, number))
    return exclusions


def aiosmtpd_package() -> Path:
    """Where the installed aiosmtpd wheel's files are (checked to be the version we test)."""
    try:
        dist = importlib.metadata.distribution("aiosmtpd")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("aiosmtpd is not installed here: run `make compat`") from None
    if dist.version != AIOSMTPD_VERSION:
        raise SystemExit(f"aiosmtpd {dist.version} is installed; the suite is {AIOSMTPD_VERSION}")
    return Path(str(dist.locate_file("aiosmtpd")))


def build_shim(build: Path, package: Path) -> Path:
    """Create ``build/aiosmtpd``: farm's modules under aiosmtpd's names, plus its tests."""
    if build.exists():
        shutil.rmtree(build)
    shim = build / "aiosmtpd"
    shim.mkdir(parents=True)
    shutil.copyfile(SHIM_TEMPLATE, shim / "__init__.py")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sub in ("tests", "testing"):
        shutil.copytree(package / sub, shim / sub, ignore=ignore)
    (build / "pytest.ini").write_text(PYTEST_INI.format(timeout=TEST_TIMEOUT))
    return shim


@dataclass(eq=False)
class Tally:
    """Outcomes by test: what ``N passed, M excluded of T`` is computed from."""

    exclusions: list[Exclusion]
    prefix: str
    collected: int = 0
    excluded: list[str] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    collect_errors: list[str] = field(default_factory=list)

    def _exclusion(self, nodeid: str) -> Exclusion | None:
        short = nodeid.removeprefix(self.prefix)
        for exclusion in self.exclusions:
            node = exclusion.node
            if short == node or short.startswith((node + "[", node + "::")):
                return exclusion
        return None

    # -- pytest hooks ----------------------------------------------------------------------

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.collect_errors.append(report.nodeid)

    def pytest_collection_modifyitems(self, config: Any, items: list[Any]) -> None:
        kept, dropped = [], []
        for item in items:
            exclusion = self._exclusion(item.nodeid)
            if exclusion is None:
                kept.append(item)
            else:
                exclusion.matched += 1
                dropped.append(item)
        self.collected = len(items)
        self.excluded = [item.nodeid for item in dropped]
        items[:] = kept
        if dropped:
            config.hook.pytest_deselected(items=dropped)

    def pytest_runtest_logreport(self, report: Any) -> None:
        previous = self.outcomes.get(report.nodeid)
        if report.when == "call" or report.failed or report.skipped:
            if previous in ("failed", "skipped"):
                return
            outcome = report.outcome
            if report.failed and report.when != "call":
                outcome = "failed"  # an error in setup or teardown
            self.outcomes[report.nodeid] = outcome


def count(outcomes: Iterable[str], kind: str) -> int:
    return sum(1 for outcome in outcomes if outcome == kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=REPO / "build" / "compat")
    parser.add_argument("--list-exclusions", action="store_true", help="print them and exit")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (-x, -k ...)")
    args = parser.parse_args(argv)

    exclusions = read_exclusions()
    if args.list_exclusions:
        for exclusion in exclusions:
            print(f"{exclusion.node}: {exclusion.reason}")
        return 0
    build = args.build.resolve()
    shim = build_shim(build, aiosmtpd_package())
    tests = shim / "tests"
    # The shim shadows the installed wheel, here and in any Python the tests start.
    sys.path.insert(0, str(build))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(build), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    os.chdir(build)

    import pytest

    tally = Tally(exclusions, prefix="aiosmtpd/tests/")
    # Test paths given (aiosmtpd/tests/test_smtp.py::...) narrow the run; else all of it.
    paths = [arg for arg in args.pytest_args if arg.startswith("aiosmtpd/")]
    status = pytest.main(
        [
            "-c",
            str(build / "pytest.ini"),
            "--rootdir",
            str(build),
            *args.pytest_args,
            *([] if paths else [str(tests)]),
        ],
        plugins=[tally],
    )
    import aiosmtpd  # the shim, as the tests saw it

    if Path(aiosmtpd.__file__).resolve().parent != shim:
        print(f"compat: the tests imported aiosmtpd from {aiosmtpd.__file__}, not the shim")
        return 1

    selected_all = not args.pytest_args
    stale = [e for e in exclusions if not e.matched]
    outcomes = list(tally.outcomes.values())
    passed = count(outcomes, "passed")
    failed = count(outcomes, "failed")
    skipped = count(outcomes, "skipped")
    total = tally.collected
    for exclusion in stale if selected_all else ():
        print(f"compat: exclusions.txt:{exclusion.line}: {exclusion.node} matches no test")
    for nodeid in tally.collect_errors:
        print(f"compat: could not collect {nodeid}")
    extra = "".join(f", {n} {word}" for n, word in ((failed, "failed"), (skipped, "skipped")) if n)
    kinds = ", ".join(
        f"{sum(e.matched for e in exclusions if e.reason.startswith(kind))} {kind[:-1]}"
        for kind in REASON_KINDS
    )
    (build / "excluded.txt").write_text("".join(f"{nodeid}\n" for nodeid in tally.excluded))
    print(f"excluded by tests/compat/exclusions.txt: {kinds} (list: {build / 'excluded.txt'})")
    print(f"{passed} passed{extra}, {len(tally.excluded)} excluded of {total}")
    ok = (
        status in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
        and not failed
        and not tally.collect_errors
        and (
            not selected_all
            or (not stale and not skipped and passed + len(tally.excluded) == total)
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
