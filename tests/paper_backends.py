"""The paper-exact backend tests (marker ``paper_backend``: detectron2, MMSegmentation), a pytest plugin that
``conftest.py`` loads.

Where the packages are missing these tests skip. With ``ICM_REQUIRE_PAPER_BACKENDS=1`` (``.ci/run`` sets it when
``../shared/wheels`` has the wheels that ``make setup-paper`` installs) such a skip is a failure, and the terminal
summary lists every marked test with its outcome and time, so the CI log shows that they ran.
"""
from __future__ import annotations

import os

import pytest

RUNS = pytest.StashKey[dict]()  # per session: {nodeid: {"outcome", "seconds"}}


def required() -> bool:
    return os.environ.get("ICM_REQUIRE_PAPER_BACKENDS", "") not in ("", "0")


def _skip_reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if item.get_closest_marker("paper_backend") is None:
        return
    if report.skipped and required():
        report.outcome = "failed"
        report.longrepr = (f"{_skip_reason(report)}\nICM_REQUIRE_PAPER_BACKENDS=1: the paper-exact backend tests "
                           "must run, not skip (make setup-paper installs detectron2 and MMSegmentation from "
                           "../shared/wheels)")
    run = item.config.stash.setdefault(RUNS, {}).setdefault(item.nodeid, {"outcome": "passed", "seconds": 0.0})
    run["seconds"] += report.duration
    if report.outcome != "passed" and run["outcome"] == "passed":
        run["outcome"] = report.outcome


def pytest_terminal_summary(terminalreporter):
    runs = terminalreporter.config.stash.get(RUNS, {})
    if not runs:
        return
    terminalreporter.section("paper-exact backend tests (detectron2, MMSegmentation)")
    for nodeid, run in sorted(runs.items()):
        terminalreporter.write_line(f"{run['outcome']:>8} {run['seconds']:8.2f} s  {nodeid}")
    outcomes = [run["outcome"] for run in runs.values()]
    total = sum(run["seconds"] for run in runs.values())
    counts = ", ".join(f"{outcomes.count(o)} {o}" for o in ("passed", "skipped", "failed") if o in outcomes)
    terminalreporter.write_line(f"{counts} in {total:.1f} s (required: {'yes' if required() else 'no'})")
