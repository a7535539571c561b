"""A newcomer finds any script or template in one hop: the README of scripts/ and of
templates/ names every file of its folder; and every test a page names exists."""
from __future__ import annotations

import re

import pytest

from conftest import REPO


@pytest.mark.parametrize("folder, pattern", [("scripts", "*"), ("templates", "*.py"),
                                             ("templates", "*.sbatch")])
def test_readme_names_every_file_of_its_folder(folder, pattern):
    readme = (REPO / folder / "README.md").read_text()
    files = sorted(p.name for p in (REPO / folder).glob(pattern)
                   if p.is_file() and p.name != "README.md")
    unnamed = [name for name in files if f"`{name}`" not in readme]
    assert files and not unnamed, f"{folder}/README.md does not name {unnamed}"


def test_every_test_a_page_names_exists():
    """A page that says `tests/test_x.py::test_y` proves a claim sends the reader to a test
    that must exist; a renamed test would leave the claim unproved and the link dead."""
    pages = [*REPO.glob("docs/**/*.md"), *REPO.glob("*.md"), *REPO.glob("*/README.md"),
             *REPO.glob("*/*/README.md")]
    dead = []
    for page in pages:
        for path, name in re.findall(r"(tests/\w+\.py)::(test_\w+)", page.read_text()):
            test_file = REPO / path
            if not test_file.exists() or f"def {name}(" not in test_file.read_text():
                dead.append(f"{page.relative_to(REPO)}: {path}::{name}")
    assert pages and not dead, "pages name tests that do not exist:\n" + "\n".join(dead)
