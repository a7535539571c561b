"""Run notebooks top to bottom and store their outputs, the way the tests compare them.

    .venv/bin/python scripts/execute_notebooks.py notebooks/01-basic-checkpoint.ipynb ...

Each notebook is executed in place with one OpenMP thread (as the tests run it), then the
per-cell execution timestamps that Jupyter adds are removed: they change at every run and
would make every re-run a diff of the whole file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def execute(notebook: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([str(VENV_BIN / "jupyter"), "execute", "--inplace", str(notebook)],
                   env=env, check=True)
    content = json.loads(notebook.read_text())
    for cell in content["cells"]:
        cell.get("metadata", {}).pop("execution", None)
    notebook.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        execute(Path(path))
