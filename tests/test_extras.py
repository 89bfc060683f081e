"""The optional extras' tests: every extra known to the suite, and none passing by skipping where it is installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from .conftest import EXTRAS, ROOT

INNER_CONFTEST = """
from tests import conftest
from tests.conftest import pytest_collection_modifyitems, pytest_configure, pytest_runtest_makereport  # noqa: F401

conftest.EXTRAS.update({"here": ("json",), "absent": ("no_such_module_finetune_test",)})
"""

INNER_TESTS = """
import pytest

@pytest.mark.extra("here")
def test_installed_and_passing():
    pass

@pytest.mark.extra("here")
def test_installed_but_skipping():
    pytest.skip("../shared is absent")

@pytest.mark.extra("absent")
def test_not_installed():
    raise AssertionError("never runs")

def test_no_extra_may_skip():
    pytest.skip("not an extra's test")
"""


def test_the_suites_extras_are_pyprojects_and_each_has_tests() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) == set(extras) - {"dev", "docs"}  # docs: the site's build tools, tested by make docs (CI)
    marked = {m for p in (ROOT / "tests").glob("test_*.py") for m in re.findall(r'extra\("(\w+)"\)', p.read_text())}
    assert marked >= set(EXTRAS), f"extras without a test: {set(EXTRAS) - marked}"


def test_an_installed_extras_test_that_skips_fails(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "-p", "no:xdist", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    out = proc.stdout
    assert re.search(r"1 failed, 1 passed, 2 skipped", out), out[-3000:]
    assert "FAILED test_inner.py::test_installed_but_skipping" in out
    assert "the here extra is installed, yet this test skipped: ../shared is absent" in out
    assert "the absent extra is not installed (no_such_module_finetune_test)" in out
