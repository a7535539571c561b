"""A newcomer finds any script or template in one hop: the README of scripts/ and of
templates/ names every file of its folder."""
from __future__ import annotations

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
