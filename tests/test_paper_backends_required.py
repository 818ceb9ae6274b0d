"""The CI guard of ``tests/paper_backends.py``: a skipped ``paper_backend`` test fails with
ICM_REQUIRE_PAPER_BACKENDS=1, and the summary lists every such test with its outcome and time."""
from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.paper_backend
@pytest.mark.skipif(True, reason="detectron2 is not installed")
def test_needs_detectron2():
    pass

@pytest.mark.paper_backend
def test_with_mmseg():
    pass

def test_other():
    pytest.skip("not a paper backend test")
"""


@pytest.fixture
def project(pytester):
    pytester.makeconftest("from paper_backends import pytest_runtest_makereport, pytest_terminal_summary\n")
    pytester.makeini("[pytest]\nmarkers =\n    paper_backend: needs detectron2 or MMSegmentation\n")
    pytester.makepyfile(test_backends=TESTS)
    return pytester


def test_a_skip_is_allowed_by_default(project, monkeypatch):
    monkeypatch.delenv("ICM_REQUIRE_PAPER_BACKENDS", raising=False)
    result = project.runpytest()
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*paper-exact backend tests*", "*skipped*test_needs_detectron2*",
                                 "*passed*test_with_mmseg*", "1 passed, 1 skipped in * s (required: no)"])


def test_a_skip_fails_when_required(project, monkeypatch):
    monkeypatch.setenv("ICM_REQUIRE_PAPER_BACKENDS", "1")
    result = project.runpytest()
    result.assert_outcomes(passed=1, skipped=1, errors=1)  # a failed setup phase counts as an error
    result.stdout.fnmatch_lines(["*detectron2 is not installed*", "*ICM_REQUIRE_PAPER_BACKENDS=1*must run*",
                                 "1 passed, 1 failed in * s (required: yes)"])
