"""pytest plugin behind `make grade`: fixtures that give a grader the learner's code, a
`task(n)` marker that ties each check to a task, and a JSON record of every check with a
message written for the learner. scripts/grade.py runs it and prints the score table.

A grader test file (exercises/exNN-*/test_grader.py) looks like this::

    @pytest.mark.task(1)
    def test_optimizer_state_is_saved(learner):
        \"\"\"The checkpoint holds the optimizer state.\"\"\"
        ...
        assert "optimizer" in state, "capture_training_state(...) returned no 'optimizer'"

When the functions of one task call those of another, use ``task_kit`` instead of
``learner``: the reference kit with only the checked task's functions taken from the
learner's file, so that a mistake in one task never costs the points of another.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import pytest

from make_starters import _find_function, load_exercise

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"


def content_key(*parts: Path | str) -> str:
    """A short hash of files (name and bytes) and strings: equal keys, equal inputs."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.name.encode() + part.read_bytes() if isinstance(part, Path) else part.encode()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:20]


def reference_run_folder(key: str, produce: Callable[[Path], None]) -> Path:
    """The folder that ``produce(folder)`` fills with a run of the *reference* kit. Made
    once per key when GRADER_CACHE_DIR is set (tests/test_exercises.py sets it, since it
    grades one exercise many times); without it, a new folder for this grading."""
    cache = os.environ.get("GRADER_CACHE_DIR")
    if not cache:
        folder = Path(tempfile.mkdtemp(prefix="reference-"))
        produce(folder)
        return folder
    final = Path(cache) / f"reference-{key}"
    if not final.exists():
        Path(cache).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".making-", dir=cache))
        produce(folder)  # raises when the reference run fails: nothing is cached then
        try:
            folder.rename(final)
        except OSError:  # another grading made it meanwhile: theirs is as good
            shutil.rmtree(folder, ignore_errors=True)
    return final


def pytest_addoption(parser):
    parser.addoption("--grade-json", help="where to write the result of every check")
    parser.addoption("--grade-tasks", help="comma-separated task numbers: run only their checks")


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--grade-tasks")
    if not wanted:
        return
    numbers = {int(n) for n in wanted.split(",")}
    keep = [i for i in items if (m := i.get_closest_marker("task")) and m.args[0] in numbers]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def pytest_configure(config):
    config.addinivalue_line("markers", "task(number): the exercise task a check grades")
    config._grading_records = []


@pytest.fixture(scope="session")
def learner_dir(tmp_path_factory) -> Path:
    """A folder that holds the learner's file under the name the templates import
    (GRADE_AS, e.g. checkpoint_utils.py) and the template scripts that use it. Real
    training processes run there, so they run the learner's code."""
    source = Path(os.environ["GRADE_FILE"])
    folder = tmp_path_factory.mktemp("learner")
    for name in os.environ.get("GRADE_WITH", "").split():
        shutil.copy(TEMPLATES / name, folder / name)
    shutil.copy(source, folder / os.environ["GRADE_AS"])
    return folder


@pytest.fixture(scope="session")
def learner(learner_dir):
    """The learner's module, imported from learner_dir."""
    sys.path.insert(0, str(learner_dir))
    name = Path(os.environ["GRADE_AS"]).stem
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def _import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference():
    """The reference kit (the template), imported under another name: graders build a
    task's inputs with it, so each task is graded on its own."""
    name = Path(os.environ["GRADE_AS"]).stem
    return _import_file(TEMPLATES / f"{name}.py", f"reference_{name}")


def _first_line(node: ast.stmt) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def write_hybrid_kit(folder: Path, functions: Sequence[str]) -> Path:
    """Write into ``folder`` the reference kit, under the learner's file name (GRADE_AS),
    with only ``functions`` ("name" or "Class.name") taken from the learner's file, beside
    the GRADE_WITH scripts; return the kit's path.

    A check of one task runs such a kit, in-process or as a real training process: the
    learner's code for that task and the reference for everything else, so a mistake in
    another task never costs this task's points. The learner's top-level imports and the
    top-level functions, classes and constants that the reference lacks are appended, so
    that helpers of their own keep working.
    """
    reference = (TEMPLATES / os.environ["GRADE_AS"]).read_text()
    learner_file = Path(os.environ["GRADE_FILE"])
    learner = learner_file.read_text()
    ours, theirs = ast.parse(reference), ast.parse(learner, filename=learner_file.name)
    lines, their_lines = reference.splitlines(), learner.splitlines()
    swaps = []
    for dotted in functions:
        try:
            mine = _find_function(theirs, dotted)
        except (LookupError, StopIteration):
            raise AssertionError(f"your file has no function {dotted}: keep the names and "
                                 "signatures of the starter") from None
        original = _find_function(ours, dotted)
        block = "\n".join(their_lines[_first_line(mine) - 1:mine.end_lineno])
        if mine.col_offset != original.col_offset:
            block = textwrap.indent(textwrap.dedent(block), " " * original.col_offset)
        swaps.append((_first_line(original) - 1, original.end_lineno, block.splitlines()))
    for start, end, block in sorted(swaps, reverse=True):
        lines[start:end] = block
    known = _top_level_names(ours)
    for node in theirs.body:
        is_import = (isinstance(node, (ast.Import, ast.ImportFrom))
                     and getattr(node, "module", None) != "__future__")
        if is_import or (_top_level_names(ast.Module([node], [])) - known):
            lines += [""] + their_lines[_first_line(node) - 1:node.end_lineno]
    folder.mkdir(parents=True, exist_ok=True)
    for name in os.environ.get("GRADE_WITH", "").split():
        shutil.copy(TEMPLATES / name, folder / name)
    kit = folder / os.environ["GRADE_AS"]
    kit.write_text("\n".join(lines) + "\n")
    return kit


@pytest.fixture(scope="session")
def _task_kits() -> dict:
    return {}


@pytest.fixture
def task_kit(request, tmp_path_factory, _task_kits):
    """The kit a check of task N runs (N from its ``task`` marker): the hybrid of
    ``write_hybrid_kit`` with task N's functions, as exercise.toml lists them, imported
    as a module. Its folder, ``Path(task_kit.__file__).parent``, also holds the
    GRADE_WITH scripts: a training process started there runs the same code."""
    number = request.node.get_closest_marker("task").args[0]
    if number not in _task_kits:
        tasks = load_exercise(request.path.parent)["tasks"]
        functions = next(t["functions"] for t in tasks if t["number"] == number)
        kit = write_hybrid_kit(tmp_path_factory.mktemp(f"task{number}-kit"), functions)
        _task_kits[number] = _import_file(kit, f"task{number}_{kit.stem}")
    return _task_kits[number]


def learner_message(excinfo) -> str:
    """The part of a failure a learner needs: our assertion message, or what their code
    raised, without pytest's introspection."""
    error = excinfo.value
    if isinstance(error, NotImplementedError):
        return f"not implemented yet: {error}"
    if isinstance(error, (AssertionError, pytest.fail.Exception)):  # assert, pytest.fail
        text = str(error).split("\nassert ")[0].strip()
        return text or "a check failed"
    return f"your code raised {type(error).__name__}: {error}".strip()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.failed):
        marker = item.get_closest_marker("task")
        doc = (item.function.__doc__ or item.name).strip().splitlines()[0]
        item.config._grading_records.append({
            "task": marker.args[0] if marker else None,
            "check": doc,
            "passed": report.passed,
            "message": learner_message(call.excinfo) if call.excinfo else "",
        })


def pytest_sessionfinish(session):
    path = session.config.getoption("--grade-json")
    if path:
        Path(path).write_text(json.dumps(session.config._grading_records, indent=2))
