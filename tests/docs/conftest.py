"""The commands the pages mark instead of running, listed after every run that read them."""

from __future__ import annotations

import pytest
from docs_shell import MARKED_KEY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config):
    listing = config.stash.get(MARKED_KEY, None)
    if listing:
        terminalreporter.section(f"{len(listing)} documented commands marked, not run")
        for line in listing:
            terminalreporter.write_line(line)
