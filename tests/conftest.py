import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from report import REPORT  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("measured figures")
        for key in sorted(REPORT):
            terminalreporter.write_line(f"{key}: {REPORT[key]}")
