"""Print the requirements of pyproject.toml, one per line: the base list and each extra
named on the command line. Used by scripts/setup-venv so that pyproject.toml is the only
place where dependencies are written down."""
import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    try:
        requirements += project["optional-dependencies"][extra]
    except KeyError:
        sys.exit(f"list-requirements: pyproject.toml has no extra called {extra!r}")
print("\n".join(requirements))
