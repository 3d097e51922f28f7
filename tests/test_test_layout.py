"""The test suite's own house rule: no test file imports another one.

What several files share has one home: fixtures in tests/conftest.py (pytest finds them, nobody imports them) and
plain helpers in the tests/support/ package. A module directly in tests/ -- a test file, conftest.py, a worker
script run by path -- is never imported, so moving or splitting a test file cannot break another one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SUPPORT = "support"


def _imported(path: Path, tests: Path) -> set[str]:
    """Absolute names of the modules `path` imports; relative imports resolved against its place under `tests`."""
    package = list(path.relative_to(tests).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from .x import y` inside tests/support: relative to the file's package
                base = package[: len(package) - node.level + 1]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                names.add(node.module or "")
    return names


def cross_imports(tests: Path) -> list[tuple[str, str]]:
    """(file, module) for every import of a module that sits directly in `tests` (test_*.py, conftest.py, a
    script), as `x` or `tests.x`, from any .py file below `tests`; the support package is the one allowed home."""
    top = {p.stem for p in tests.glob("*.py")}
    bad = []
    for path in sorted(tests.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        for name in _imported(path, tests):
            parts = name.split(".")
            first = parts[1] if parts[0] == "tests" and len(parts) > 1 else parts[0]
            if first in top and first != SUPPORT:
                bad.append((path.relative_to(tests).as_posix(), name))
    return sorted(bad)


def test_no_test_file_imports_another_module_of_tests() -> None:
    assert cross_imports(TESTS) == [], "move what is shared to tests/conftest.py (fixtures) or tests/support/"


def test_helpers_live_in_the_support_package() -> None:
    """Every importable helper is below tests/support/; directly in tests/ are test files, conftest.py and the
    scripts that tests start by path (they are not imported: `cross_imports` would catch it)."""
    assert (TESTS / SUPPORT / "__init__.py").is_file()
    assert not [p.name for p in TESTS.glob("*_fixtures.py")], "fixtures go to conftest.py, helpers to support/"


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "rel, line",
    [
        ("test_b.py", "from test_a import CASES"),
        ("test_b.py", "import test_a"),
        ("test_b.py", "from tests.test_a import CASES"),
        ("test_b.py", "import tests.test_a as a"),
        ("test_b.py", "from conftest import helper"),
        ("test_b.py", "def f():\n    from worker import main"),  # a lazy import counts too
        ("support/x.py", "from ..test_a import CASES"),  # relative, out of the support package
        ("support/x.py", "from test_a import CASES"),
    ],
)
def test_a_planted_cross_import_is_caught(tmp_path: Path, rel: str, line: str) -> None:
    tests = _plant(tmp_path, {"test_a.py": "CASES = []\n", "conftest.py": "", "worker.py": "", rel: line + "\n"})
    assert [f for f, _ in cross_imports(tests)] == [rel]


def test_imports_of_support_and_packages_pass(tmp_path: Path) -> None:
    lines = "import json\nfrom support.x import y\nfrom tests.support.x import y\nfrom spt_core import plan"
    tests = _plant(
        tmp_path,
        {"test_a.py": lines, "support/__init__.py": "", "support/x.py": "from .z import y\n", "support/z.py": "y = 1"},
    )
    assert cross_imports(tests) == []
