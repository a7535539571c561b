"""templates/copy-lists.toml says what a user copies for each training script. These tests
hold it to the truth: every training script is declared, its `needs` are exactly the
course files it imports (and what those import), its `extras` exactly the ones it
switches on with optional_extra(...), each script starts in a folder that holds its needs
alone, and the table in templates/README.md is written from the same file."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys

import pytest

import copy_lists
from conftest import TEMPLATES, outside_slurm

COURSE_MODULES = {path.stem for path in TEMPLATES.glob("*.py")}
# The scripts a user runs: the training scripts and the preflight check.
SCRIPTS_A_USER_RUNS = sorted(path.stem for path in TEMPLATES.glob("train_*.py")) + ["preflight"]
NEEDS_TENSORFLOW = {"train_tf", "train_keras_fit", "train_tf_multiworker"}


def imported_course_modules(module: str) -> tuple[set[str], set[str]]:
    """(imported for sure, switched on when present) course modules of one file."""
    tree = ast.parse((TEMPLATES / f"{module}.py").read_text())
    hard, optional = set(), set()
    # `try: import x / except ModuleNotFoundError: x = None` switches x on when present.
    tolerated = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try)
                 and any(getattr(h.type, "id", "") in ("ModuleNotFoundError", "ImportError")
                         for h in node.handlers)
                 for statement in node.body for inner in ast.walk(statement)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and id(node) in tolerated:
            optional |= {alias.name for alias in node.names if alias.name in COURSE_MODULES}
        elif isinstance(node, ast.Import):
            hard |= {alias.name for alias in node.names if alias.name in COURSE_MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module in COURSE_MODULES:
            hard.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "optional_extra":
            optional.add(node.args[0].value)
    return hard, optional


def closure(modules: set[str]) -> set[str]:
    """``modules`` and every course module they import, however deep."""
    found, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in found:
            found.add(module)
            todo += imported_course_modules(module)[0]
    return found


def actual_copy_list(script: str) -> tuple[set[str], set[str]]:
    needs = closure({script}) - {script}
    optional = set().union(*(imported_course_modules(m)[1] for m in needs | {script}))
    extras = closure(optional) - needs - {script}
    return {f"{m}.py" for m in needs}, {f"{m}.py" for m in extras}


def test_every_script_a_user_runs_is_declared():
    assert set(copy_lists.copy_lists()) == set(SCRIPTS_A_USER_RUNS)


@pytest.mark.parametrize("script", SCRIPTS_A_USER_RUNS)
def test_declared_lists_match_what_the_script_imports(script):
    declared = copy_lists.copy_lists()[script]
    needs, extras = actual_copy_list(script)
    assert set(declared["needs"]) == needs, (
        f"{script}.py imports {sorted(needs)}; copy-lists.toml says {declared['needs']}")
    assert set(declared["extras"]) == extras, (
        f"{script}.py switches on {sorted(extras)}; copy-lists.toml says {declared['extras']}")


def test_readme_table_is_written_from_the_declared_lists():
    assert copy_lists.main(["--check"]) == 0


@pytest.mark.integration
@pytest.mark.parametrize("script", SCRIPTS_A_USER_RUNS)
def test_script_starts_beside_its_needs_alone(script, tmp_path):
    if script in NEEDS_TENSORFLOW:
        pytest.importorskip("tensorflow")
    for name in copy_lists.copy_set(script, extras=False):
        shutil.copy(TEMPLATES / name, tmp_path / name)
    env = outside_slurm()
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, str(tmp_path / f"{script}.py"), "--help"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
