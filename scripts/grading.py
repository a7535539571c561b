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
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from make_starters import LANGUAGES, find_function, function_file, function_source, load_exercise

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"


def reference_template() -> Path:
    """The reference solution of the exercise being graded: GRADE_TEMPLATE (set by
    scripts/grade.py), else templates/<GRADE_AS>. GRADE_WITH files sit beside it."""
    template = os.environ.get("GRADE_TEMPLATE")
    return Path(template) if template else TEMPLATES / os.environ["GRADE_AS"]


def grade_language() -> str:
    return os.environ.get("GRADE_LANGUAGE", "python")


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
        shutil.copy(reference_template().parent / name, folder / name)
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
    if LANGUAGES[grade_language()].file_per_function:
        return _write_folder_kit(folder, functions)
    reference = reference_template().read_text()
    learner_file = Path(os.environ["GRADE_FILE"])
    learner = learner_file.read_text()
    if grade_language() != "python":
        return _write_kit(folder, _hybrid_by_spans(reference, learner, functions))
    ours, theirs = ast.parse(reference), ast.parse(learner, filename=learner_file.name)
    lines, their_lines = reference.splitlines(), learner.splitlines()
    swaps = []
    for dotted in functions:
        try:
            mine = find_function(theirs, dotted)
        except (LookupError, StopIteration):
            raise AssertionError(f"your file has no function {dotted}: keep the names and "
                                 "signatures of the starter") from None
        original = find_function(ours, dotted)
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
    return _write_kit(folder, "\n".join(lines) + "\n")


def _write_kit(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in os.environ.get("GRADE_WITH", "").split():
        shutil.copy(reference_template().parent / name, folder / name)
    kit = folder / os.environ["GRADE_AS"]
    kit.write_text(text)
    return kit


def _hybrid_by_spans(reference: str, learner: str, functions: Sequence[str]) -> str:
    """write_hybrid_kit for the other languages, by the rules of make_starters.LANGUAGES:
    each function's whole definition is swapped for the learner's, and the learner's
    top-level functions that the reference lacks (helpers of their own) are appended."""
    rules = LANGUAGES[grade_language()]
    lines, their_lines = reference.splitlines(), learner.splitlines()
    swaps = []
    for name in functions:
        try:
            mine = rules.find(learner, name)
        except LookupError:
            raise AssertionError(f"your file has no function {name}: keep the names and "
                                 "signatures of the starter") from None
        original = rules.find(reference, name)
        swaps.append((original.start, original.end, their_lines[mine.start:mine.end + 1]))
    for start, end, block in sorted(swaps, reverse=True):
        lines[start:end + 1] = block
    for name in set(rules.function_names(learner)) - set(rules.function_names(reference)):
        span = rules.find(learner, name)
        lines += [""] + their_lines[span.start:span.end + 1]
    return "\n".join(lines) + "\n"


def learner_folder() -> Path:
    """The learner's folder of a file_per_function (MATLAB) exercise: GRADE_FILE, or the
    folder of GRADE_FILE when it names one of the files."""
    given = Path(os.environ["GRADE_FILE"])
    return given if given.is_dir() else given.parent


def _write_folder_kit(folder: Path, functions: Sequence[str]) -> Path:
    """write_hybrid_kit for a kit of one function per file (MATLAB): every file of the
    reference kit's folder, with <name>.m of each function in ``functions`` taken from the
    learner's folder (with the local functions it holds), and the learner's own .m files
    that the kit lacks (helpers). Returns the folder."""
    reference, learner = reference_template(), learner_folder()
    folder.mkdir(parents=True, exist_ok=True)
    for path in reference.glob("*.m"):
        shutil.copy(path, folder / path.name)
    for name in functions:
        mine = learner / f"{name}.m"
        if not mine.is_file():
            raise AssertionError(f"{learner} has no {name}.m: keep the starter's files, "
                                 "their names and their function lines")
        shutil.copy(mine, folder / mine.name)
    for mine in learner.glob("*.m"):
        if not (reference / mine.name).exists():
            shutil.copy(mine, folder / mine.name)
    return folder


@pytest.fixture(scope="session")
def _task_kits() -> dict:
    return {}


@pytest.fixture(scope="session")
def _task_kit_files() -> dict:
    return {}


def task_functions_written(folder: Path, number: int) -> list[str]:
    """The functions of task ``number`` of the exercise in ``folder``; NotImplementedError
    when the learner's file still has every one of them as the starter has it."""
    exercise = load_exercise(folder)
    functions = next(t["functions"] for t in exercise["tasks"] if t["number"] == number)
    if still_the_starter(exercise, functions):
        raise NotImplementedError(f"{', '.join(functions)} still as in the starter "
                                  "(see README.md)")
    return functions


def still_the_starter(exercise: dict, functions: Sequence[str]) -> bool:
    """Whether every one of ``functions`` in the learner's file is the starter's stub,
    character for character. Its checks could only fail, so none is run: an untouched
    starter is graded in seconds."""
    language, mine = exercise["language"], Path(os.environ["GRADE_FILE"])
    starter = exercise["folder"] / exercise["starter"]
    try:
        return all(function_source(function_file(mine, name, language).read_text(), name,
                                   language)
                   == function_source(function_file(starter, name, language).read_text(),
                                      name, language) for name in functions)
    except (LookupError, OSError, StopIteration, SyntaxError):
        return False  # a function missing or unreadable: the checks say what is wrong


@pytest.fixture
def task_kit_file(request, tmp_path_factory, _task_kit_files) -> Path:
    """The path of the kit a check of task N runs (N from its ``task`` marker), in any
    language: the hybrid of ``write_hybrid_kit`` with task N's functions, as
    exercise.toml lists them, beside the GRADE_WITH files. For a MATLAB exercise the kit
    is a folder, and this is that folder."""
    number = request.node.get_closest_marker("task").args[0]
    functions = task_functions_written(request.path.parent, number)
    if number not in _task_kit_files:
        _task_kit_files[number] = write_hybrid_kit(
            tmp_path_factory.mktemp(f"task{number}-kit"), functions)
    return _task_kit_files[number]


@pytest.fixture
def task_kit(request, task_kit_file, _task_kits):
    """``task_kit_file`` imported as a module (Python exercises). Its folder,
    ``Path(task_kit.__file__).parent``, also holds the GRADE_WITH scripts: a training
    process started there runs the same code."""
    number = request.node.get_closest_marker("task").args[0]
    if number not in _task_kits:
        _task_kits[number] = _import_file(task_kit_file, f"task{number}_{task_kit_file.stem}")
    return _task_kits[number]


# ----------------------------------------------------------------------------- R graders
R_CHECK = """\
options(warn = 1, checkpoint.fsync = FALSE)  # fsync is not graded: keep grading quick
# grader_try(expr): the value of expr, or list(error = its message) when it fails; a
# starter's stop("TODO ...") still goes through, so that it reads as "not implemented".
grader_try <- function(expr) {{
  tryCatch(expr, error = function(e) {{
    if (startsWith(conditionMessage(e), "TODO ")) stop(e)
    list(error = conditionMessage(e))
  }})
}}
.grader_value <- tryCatch({{
  .grader_where <- "loading your file"
  source({kit})
  .grader_where <- "the check"
  {code}
}}, error = function(e) structure(list(where = .grader_where, message = conditionMessage(e)),
                                  class = "grader_error"))
if (inherits(.grader_value, "grader_error")) {{
  cat("GRADER-ERROR", jsonlite::toJSON(unclass(.grader_value), auto_unbox = TRUE), "\\n")
  quit(save = "no", status = 3)
}}
cat("GRADER-VALUE", jsonlite::toJSON(.grader_value, auto_unbox = TRUE, digits = NA,
                                     null = "null"), "\\n")
"""


@dataclasses.dataclass
class RResult:
    value: Any     # what the check's R code returned, through JSON
    messages: str  # what R wrote to stderr: message(), warnings


def run_r(kit: Path, code: str, *, cwd: Path | None = None, timeout: float = 30) -> RResult:
    """Source ``kit`` in a fresh Rscript, run ``code`` (R; its value goes back as JSON),
    and return the value and R's messages. An R error becomes NotImplementedError when it
    is a starter's ``stop("TODO ...")``, else an AssertionError that names it."""
    script = Path(tempfile.mkdtemp(prefix="r-check-")) / "check.R"
    script.write_text(R_CHECK.format(kit=json.dumps(str(kit)), code=code))
    try:
        run = subprocess.run(["Rscript", str(script)], cwd=cwd or script.parent, text=True,
                             capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"your code did not finish within {timeout:.0f} s") from None
    finally:
        shutil.rmtree(script.parent, ignore_errors=True)
    for line in run.stdout.splitlines():
        if line.startswith("GRADER-ERROR "):
            error = json.loads(line.removeprefix("GRADER-ERROR "))
            if error["message"].startswith("TODO "):
                raise NotImplementedError(error["message"].removeprefix("TODO "))
            raise AssertionError(f"your code stopped with an error in {error['where']}: "
                                 f"{error['message']}")
        if line.startswith("GRADER-VALUE "):
            return RResult(json.loads(line.removeprefix("GRADER-VALUE ")), run.stderr)
    raise AssertionError(f"R ended without a result (exit {run.returncode}): "
                         f"{(run.stderr or run.stdout).strip()[-1500:]}")


# ----------------------------------------------------------------------------- Octave graders
# One octave-cli runs every probe of a task: Octave starts in a fraction of a second, but a
# grading of twenty checks that each start one would still take seconds. Each probe is a
# function of a script file, so it starts with an empty workspace; what it returns comes
# back through JSON, with what it printed.
OCTAVE_CHECK = """\
1;  % a script: the functions below are the grader's helpers and probes
warning('off', 'Octave:shadowed-function');  % the grader's spies shadow built-ins on purpose
confirm_recursive_rmdir(false);
crash_dumps_octave_core(false);
addpath({kit});
{helpers}
function grader_report(name, record)
  record.name = name;
  printf('GRADER-RESULT %s\\n', jsonencode(record));
  fflush(stdout);
end
{probes}
for grader_i = 1:{count}
  grader_name = sprintf('grader_probe_%d', grader_i);
  try
    grader_printed = evalc(['grader_value = ' grader_name '();']);
    grader_report(grader_name, struct('value', {{grader_value}}, 'printed', grader_printed));
  catch grader_error
    grader_where = {{}};  % where it happened: the innermost three frames that are not ours
    for grader_frame = reshape(grader_error.stack, 1, [])
      if ~strncmp(grader_frame.name, 'grader_', 7) && numel(grader_where) < 3
        grader_where{{end + 1}} = sprintf('%s line %d', grader_frame.name, grader_frame.line);
      end
    end
    grader_where = strjoin(grader_where, ', called from ');
    grader_report(grader_name, struct('error', grader_error.message, 'identifier', ...
                  grader_error.identifier, 'where', grader_where));
  end
end
"""


@dataclasses.dataclass
class OctaveResult:
    value: Any     # what the probe function returned, through JSON
    printed: str   # what it printed (ckpt_print, disp, warnings)


class OctaveRun:
    """The results of run_octave, by probe name. ``run[name]`` is an OctaveResult, or
    raises what the learner needs to read: NotImplementedError for a starter's
    error('ckpt:todo', 'TODO: ...'), an AssertionError that names any other error."""

    def __init__(self, records: dict[str, dict], failure: str):
        self.records, self.failure = records, failure

    def __getitem__(self, name: str) -> OctaveResult:
        record = self.records.get(name)
        if record is None:
            raise AssertionError(self.failure or f"Octave gave no result for {name}")
        if "error" in record:
            message = record["error"]
            if record.get("identifier") == "ckpt:todo" or message.startswith("TODO"):
                raise NotImplementedError(message.removeprefix("TODO: "))
            where = f" (in {record['where']})" if record.get("where") else ""
            raise AssertionError(f"your code stopped with an error{where}: {message}")
        return OctaveResult(record["value"], record["printed"])


def run_octave(kit: Path, probes: dict[str, str], *, helpers: str = "",
               cwd: Path | None = None, timeout: float = 60) -> OctaveRun:
    """Run every probe in one octave-cli, with the folder ``kit`` first on the path.

    ``probes`` maps a name to the body of a function (Octave code) that sets ``value``;
    ``helpers`` holds Octave functions every probe may call. A probe that raises does not
    stop the others; one that never ends costs the rest of its run (``timeout``)."""
    names = list(probes)
    bodies = "\n".join(f"function value = grader_probe_{i + 1}()\n{textwrap.dedent(code)}\nend"
                       for i, code in enumerate(probes.values()))
    script = Path(tempfile.mkdtemp(prefix="octave-check-")) / "grader_check.m"
    script.write_text(OCTAVE_CHECK.format(kit=_octave_string(str(kit)), helpers=helpers,
                                          probes=bodies, count=len(names)))
    failure = ""
    try:
        run = subprocess.run(["octave-cli", "--no-history", "--no-window-system", str(script)],
                             cwd=cwd or script.parent, text=True, capture_output=True,
                             timeout=timeout)
        output = run.stdout
        if run.returncode != 0:
            failure = (f"Octave ended early (exit {run.returncode}): "
                       f"{(run.stderr or run.stdout).strip()[-1500:]}")
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or ""
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        failure = (f"your code did not finish within {timeout:.0f} s "
                   "(a loop that never ends, or a wait?)")
    finally:
        shutil.rmtree(script.parent, ignore_errors=True)
    records = {}
    for line in output.splitlines():
        if line.startswith("GRADER-RESULT "):
            record = json.loads(line.removeprefix("GRADER-RESULT "))
            records[names[int(record.pop("name").rsplit("_", 1)[1]) - 1]] = record
    return OctaveRun(records, failure)


def _octave_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@pytest.fixture(scope="session")
def _octave_runs() -> dict:
    return {}


@pytest.fixture
def octave_task(request, task_kit_file, _octave_runs) -> OctaveRun:
    """Every probe of the checked task, run once in one octave-cli on the task's hybrid
    kit. A MATLAB grader declares them in its module: OCTAVE_PROBES, {task number: {name:
    Octave code}}, and OCTAVE_HELPERS, Octave functions the probes share."""
    number = request.node.get_closest_marker("task").args[0]
    if number not in _octave_runs:
        _octave_runs[number] = run_octave(task_kit_file, request.module.OCTAVE_PROBES[number],
                                          helpers=getattr(request.module, "OCTAVE_HELPERS", ""))
    return _octave_runs[number]


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


def skip_reason(report) -> str:
    longrepr = report.longrepr  # (file, line, "Skipped: reason") for a skip
    return str(longrepr[2]).removeprefix("Skipped: ") if isinstance(longrepr, tuple) else ""


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
            "skipped": report.skipped,  # a tool this check needs is missing here
            "message": (skip_reason(report) if report.skipped else
                        learner_message(call.excinfo) if call.excinfo else ""),
        })


def pytest_sessionfinish(session):
    path = session.config.getoption("--grade-json")
    if path:
        Path(path).write_text(json.dumps(session.config._grading_records, indent=2))
