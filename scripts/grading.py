"""pytest plugin behind `make grade`: fixtures that give a grader the learner's code, a
`task(n)` marker that ties each check to a task, and a JSON record of every check with a
message written for the learner. scripts/grade.py runs it and prints the score table.

A grader test file (exercises/exNN-*/test_grader.py) looks like this::

    @pytest.mark.task(1)
    def test_optimizer_state_is_saved(learner):
        \"\"\"The checkpoint holds the optimizer state.\"\"\"
        ...
        assert "optimizer" in state, "capture_training_state(...) returned no 'optimizer'"
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"


def pytest_addoption(parser):
    parser.addoption("--grade-json", help="where to write the result of every check")


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


@pytest.fixture(scope="session")
def reference():
    """The reference kit (the template), imported under another name: graders build a
    task's inputs with it, so each task is graded on its own."""
    name = Path(os.environ["GRADE_AS"]).stem
    spec = importlib.util.spec_from_file_location(f"reference_{name}", TEMPLATES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def learner_message(excinfo) -> str:
    """The part of a failure a learner needs: our assertion message, or what their code
    raised, without pytest's introspection."""
    error = excinfo.value
    if isinstance(error, NotImplementedError):
        return f"not implemented yet: {error}"
    if isinstance(error, AssertionError):
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
