"""Shared test set-up: the templates and the course scripts are importable by name, and
tests that need a system tool skip with the install command (but fail under CI=true, so
that CI always runs everything)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"
SCRIPTS = REPO / "scripts"
for folder in (TEMPLATES, SCRIPTS):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def require_command(command: str, install: str) -> str:
    """Return the path of ``command``, or skip the test saying how to install it.
    Under CI=true a missing command is a failure: CI must run every test."""
    path = shutil.which(command)
    if path is None:
        message = f"{command} is not installed; install it with: {install}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def python_exe() -> str:
    """The interpreter running the tests (the project's .venv under `make test`)."""
    return sys.executable
