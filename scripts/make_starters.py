"""Make each exercise's starter from its reference solution, the template.

The templates are the solutions. An exercise names, in its exercise.toml, the functions a
learner writes; this script copies the template and replaces the body of each of those
functions with a stub that fails with "not implemented", keeping the signature and the
documentation (a Python docstring; the comment block above an R function). The starter
therefore always parses, loads and runs, and no solution is kept twice.

Exercises live in exercises/ (Python, graded as ex01, ex02, ...) and in <track>/exercises/
of the other language tracks (graded as r-ex01, matlab-ex01, ...). An exercise.toml says
its `language` ("python" when absent); LANGUAGES below holds, per language, how to find a
function in a file and what the stub is. Add a language there. The MATLAB track keeps one
function per file: its `template` is the kit's folder (matlab/), and its starters are one
<function>.m per function the tasks name, in the exercise folder (starters_for()).
Each exercise's job.sbatch is generated too, from the one skeleton exercises/job.sbatch.in
and the [job] table of its exercise.toml (job_file_for()), and a Makefile that makes
`make grade` work in the exercise folder (folder_makefile_for()).

    python scripts/make_starters.py            # write every starter and job file
    python scripts/make_starters.py --check    # exit 1 if a committed one is stale
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
EXERCISES = REPO / "exercises"


def exercise_roots() -> list[Path]:
    """exercises/ (Python) and the exercises/ folder of every language track (r/, ...)."""
    return [EXERCISES] + sorted(p for p in REPO.glob("*/exercises") if p.is_dir())


def exercise_name(folder: Path) -> str:
    """What `make grade EX=...` calls an exercise: ex01 in exercises/, r-ex01 in
    r/exercises/, matlab-ex01 in matlab/exercises/."""
    number = folder.name.split("-")[0]
    return number if folder.parent == EXERCISES else f"{folder.parent.parent.name}-{number}"


def load_exercise(folder: Path) -> dict:
    config = tomllib.loads((folder / "exercise.toml").read_text())
    config["folder"] = folder
    config["name"] = exercise_name(folder)
    config.setdefault("language", "python")
    return config


def all_exercises() -> list[dict]:
    return [load_exercise(f) for root in exercise_roots() for f in sorted(root.glob("ex*"))
            if (f / "exercise.toml").exists()]


# ----------------------------------------------------------------------------- Python
def find_function(tree: ast.Module, dotted: str) -> ast.FunctionDef:
    """A top-level function ("name") or a method ("Class.name")."""
    scope: list[ast.stmt] = tree.body
    *owners, name = dotted.split(".")
    for owner in owners:
        scope = next(node.body for node in scope
                     if isinstance(node, ast.ClassDef) and node.name == owner)
    for node in scope:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise LookupError(f"no function {dotted!r} in the template")


@dataclasses.dataclass(frozen=True)
class FunctionSpan:
    """Where a function is in a file, as 0-based line numbers (inclusive ranges): the
    whole definition [start, end] and the part a starter cuts out [cut_start, cut_end]."""

    start: int
    end: int
    cut_start: int
    cut_end: int
    indent: str


def python_span(source: str, dotted: str) -> FunctionSpan:
    """The body after the docstring is cut, down to the function's last line."""
    function = find_function(ast.parse(source), dotted)
    body = function.body
    has_docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                     and isinstance(body[0].value.value, str))
    first = body[1] if has_docstring and len(body) > 1 else body[0]
    cut_start = first.lineno - 1
    if has_docstring and len(body) == 1:
        cut_start = body[0].end_lineno
    start = min([function.lineno] + [d.lineno for d in function.decorator_list]) - 1
    return FunctionSpan(start, function.end_lineno - 1, cut_start, function.end_lineno - 1,
                        " " * first.col_offset)


def python_stub(message: str, indent: str) -> str:
    return f"{indent}raise NotImplementedError({message!r})"


# ----------------------------------------------------------------------------- R
def _closing_bracket(source: str, opening: int) -> int:
    """The index of the bracket that closes source[opening], skipping brackets inside
    strings ('...', "...", `...`) and # comments. (R's raw strings, r"(...)", are not
    understood: keep them out of the functions an exercise cuts.)"""
    depth, i, quote = 0, opening, None
    while i < len(source):
        char = source[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = None
        elif char in "\"'`":
            quote = char
        elif char == "#":
            i = source.find("\n", i)
            if i < 0:
                break
        elif char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise LookupError(f"unbalanced brackets from offset {opening}")


def r_span(source: str, name: str) -> FunctionSpan:
    """A top-level `name <- function(...) {` (at the start of a line) down to its matching
    `}`, which must stand alone on its line; the lines between the braces are cut."""
    match = re.search(rf"^{re.escape(name)}\s*<-\s*function\s*\(", source, re.MULTILINE)
    if match is None:
        raise LookupError(f"no top-level function {name!r} (`{name} <- function(...) {{`)")
    arguments_end = _closing_bracket(source, match.end() - 1)
    brace = arguments_end + 1 + (len(source[arguments_end + 1:]) - len(source[arguments_end + 1:].lstrip()))
    if source[brace:brace + 1] != "{":
        raise LookupError(f"{name}: the body must be a {{ ... }} block")
    closing = _closing_bracket(source, brace)
    line_of = lambda offset: source.count("\n", 0, offset)  # noqa: E731
    start, open_line, end = line_of(match.start()), line_of(brace), line_of(closing)
    lines = source.splitlines()
    if lines[open_line].rstrip()[-1:] != "{" or lines[end].strip() != "}":
        raise LookupError(f"{name}: put the opening {{ last on its line and the closing }} "
                          "alone on its own line")
    return FunctionSpan(start, end, open_line + 1, end - 1, "  ")


def r_stub(message: str, indent: str) -> str:
    return f"{indent}stop({json.dumps('TODO ' + message)})"


R_TOP_LEVEL_FUNCTION = re.compile(r"^([A-Za-z.][A-Za-z0-9._]*)\s*<-\s*function\b", re.MULTILINE)


def r_function_names(source: str) -> list[str]:
    return R_TOP_LEVEL_FUNCTION.findall(source)


def python_function_names(source: str) -> list[str]:
    return [n.name for n in ast.parse(source).body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


# ----------------------------------------------------------------------------- MATLAB
# The MATLAB kit holds one function per file, ckpt_save.m holding ckpt_save: the file's
# first (primary) function, then maybe local functions, then Octave's %!test blocks. Every
# function of the kit ends with an `end` at column 0, and only function ends are there
# (the bodies are indented), so the primary function ends at the last line `end` at
# column 0 before the next `function` or `%!` line at column 0, or before the end of file.
MATLAB_FUNCTION = re.compile(r"^function\s+(?:(?:\[[^\]]*\]|[A-Za-z]\w*)\s*=\s*)?([A-Za-z]\w*)",
                             re.MULTILINE)


def matlab_span(source: str, name: str) -> FunctionSpan:
    """The primary function of a function file, which must be `name`: its lines after the
    help comment block (the contiguous % lines after the `function` line) are cut, down to
    the line before its closing `end`."""
    lines = source.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip() and
                  not line.lstrip().startswith("%")), None)
    match = MATLAB_FUNCTION.match(lines[first]) if first is not None else None
    if match is None or match.group(1) != name:
        raise LookupError(f"the file does not start with `function ... {name}(...)`: "
                          "one function per file, named like the file")
    stop = next((i for i in range(first + 1, len(lines))
                 if lines[i].startswith(("function ", "%!"))), len(lines))
    ends = [i for i in range(first + 1, stop) if re.fullmatch(r"end\s*(%.*)?", lines[i])]
    if not ends:
        raise LookupError(f"{name}: close the function with `end` at column 0")
    end = ends[-1]
    cut_start = first + 1
    while cut_start < end and lines[cut_start].lstrip().startswith("%"):
        cut_start += 1
    body = [line for line in lines[cut_start:end] if line.strip()]
    if not body:
        raise LookupError(f"{name}: the function has no body to cut")
    if any(re.fullmatch(r"end\b.*", line) for line in lines[cut_start:end]):
        raise LookupError(f"{name}: an `end` at column 0 inside the function: indent its body")
    indent = re.match(r"\s*", body[0]).group(0) or "  "
    return FunctionSpan(first, end, cut_start, end - 1, indent)


def matlab_stub(message: str, indent: str) -> str:
    text = ("TODO: " + message).replace("'", "''").replace("\\", "\\\\").replace("%", "%%")
    return f"{indent}error('ckpt:todo', '{text}');"


def matlab_function_names(source: str) -> list[str]:
    """The primary function and the local functions of a file."""
    return MATLAB_FUNCTION.findall(source)


@dataclasses.dataclass(frozen=True)
class Language:
    find: Callable[[str, str], FunctionSpan]   # (source, function name) -> where it is
    stub: Callable[[str, str], str]            # (message, indent) -> the line that replaces a body
    function_names: Callable[[str], list[str]] # the top-level functions of a file
    unfinished: str                            # how a starter's functions say "not done yet"
    comment: str = "#"                         # starts a comment line
    # True: the template is a folder with one <function>.m file per function (MATLAB); the
    # starters are those of the exercise's functions, in the exercise folder, and the
    # header goes inside each stub, since the file must start with its `function` line.
    file_per_function: bool = False


LANGUAGES = {
    "python": Language(python_span, python_stub, python_function_names,
                       "the functions that raise NotImplementedError"),
    "r": Language(r_span, r_stub, r_function_names, 'the functions that stop with "TODO ..."'),
    "matlab": Language(matlab_span, matlab_stub, matlab_function_names,
                       "the function (it stops with error('ckpt:todo', 'TODO: ...'))",
                       comment="%", file_per_function=True),
}


def function_source(source: str, name: str, language: str = "python") -> str:
    """The whole definition of one function, as text."""
    span = LANGUAGES[language].find(source, name)
    return "\n".join(source.splitlines()[span.start:span.end + 1])


# ----------------------------------------------------------------------------- starters
def make_starter(template_source: str, tasks: list[dict], header: str,
                 language: str = "python") -> str:
    """The template with the body of every task function replaced by a stub. The header
    (comment lines) goes on top of the file, or, for file_per_function languages, whose
    file must start with its `function` line, into the body, before the stub: after a blank
    line, so that it stays out of the help text."""
    rules = LANGUAGES[language]
    lines = template_source.splitlines()
    cuts = []
    for task in tasks:
        for name in task["functions"]:
            span = rules.find(template_source, name)
            message = f"Task {task['number']}: {task['title']} (see README.md)"
            stub = [rules.stub(message, span.indent)]
            if rules.file_per_function and header:
                stub = [""] + [span.indent + line for line in header.splitlines()] + stub
            cuts.append((span.cut_start, span.cut_end, stub))
    for start, end, stub in sorted(cuts, reverse=True):
        lines[start:end + 1] = stub
    top = "" if rules.file_per_function else header
    return top + "\n".join(lines) + "\n"


def function_file(kit: Path, name: str, language: str) -> Path:
    """The file of a kit that holds function `name`: the kit itself, or, for a kit that is
    a folder of one function per file (MATLAB), <kit>/<name>.m."""
    return kit / f"{name}.m" if LANGUAGES[language].file_per_function else kit


def starters_for(exercise: dict) -> list[tuple[Path, str]]:
    """Every starter file of an exercise and its text: one file (`starter` in
    exercise.toml), or, for a MATLAB exercise, one <function>.m per function the tasks
    name, in the exercise folder (there `starter` is ".", the folder)."""
    rules = LANGUAGES[exercise["language"]]
    if not rules.file_per_function:
        return [starter_for(exercise)]
    starters = []
    for task in exercise["tasks"]:
        for name in task["functions"]:
            source = function_file(REPO / exercise["template"], name, exercise["language"])
            header = (f"% Exercise {exercise['folder'].name}, task {task['number']}: write "
                      f"this function in place of the error() below.\n% Generated from "
                      f"{source.relative_to(REPO)} by scripts/make_starters.py. Grade "
                      f"from the repository's top folder: make grade EX={exercise['name']}\n")
            one = {**task, "functions": [name]}
            starters.append((exercise["folder"] / f"{name}.m", make_starter(
                source.read_text(), [one], header, exercise["language"])))
    return starters


def starter_for(exercise: dict) -> tuple[Path, str]:
    """The starter of a one-file exercise (Python, R) and its text."""
    template = REPO / exercise["template"]
    rules = LANGUAGES[exercise["language"]]
    if rules.file_per_function:
        raise ValueError(f"{exercise['name']} has one starter per function: use starters_for()")
    header = (f"# Exercise {exercise['folder'].name}: your file. Generated from "
              f"{exercise['template']} by scripts/make_starters.py.\n"
              f"# Implement {rules.unfinished} (README.md lists the "
              "tasks),\n# then grade it from the repository's top folder: make grade EX="
              f"{exercise['name']}\n")
    return exercise["folder"] / exercise["starter"], make_starter(
        template.read_text(), exercise["tasks"], header, exercise["language"])


# ----------------------------------------------------------------------------- job files
JOB_SKELETON = EXERCISES / "job.sbatch.in"
# Per language: whose work the login node must not run, the module line(s) of the SITE
# block, what the job's first line reports, and what --file names (MATLAB: the folder).
JOB_LANGUAGES = {
    "python": ("Python", "# module load python/3.11", "", "/{starter}"),
    "r": ("R", "# module load R/4.2.2 python/3.11", ", Rscript $(command -v Rscript)",
          "/{starter}"),
    "matlab": ("Octave", "# module load octave python/3.11     # SITE: the grader runs GNU "
               "Octave (octave-cli),\n#                                    #   also for work "
               "written for MATLAB", ", octave-cli $(command -v octave-cli)", ""),
}


def sbatch_line(option: str, why: str) -> str:
    return f"#SBATCH {option}".ljust(37) + f"# {why}"


def job_file_for(exercise: dict) -> tuple[Path, str]:
    """The exercise's job.sbatch, from the one skeleton exercises/job.sbatch.in and the
    [job] table of its exercise.toml."""
    work, modules, tool, file_arg = JOB_LANGUAGES[exercise["language"]]
    job = exercise["job"]
    fields = {
        "NAME": exercise["name"], "WORK": work, "TAKES": job["takes"],
        "FOLDER": str(exercise["folder"].relative_to(REPO)), "MODULE_LINES": modules,
        "TOOL": tool, "FILE": file_arg.format(starter=exercise["starter"]),
        "JOB_NAME_LINE": sbatch_line(f"--job-name=grade-{exercise['name']}",
                                     "the name in squeue and in the output file name"),
        "NTASKS_LINE": sbatch_line("--ntasks=1", job["tasks_why"]),
        "CPUS_LINE": sbatch_line(f"--cpus-per-task={job['cpus']}", job["cpus_why"]),
    }
    text = re.sub(r"@([A-Z_]+)@", lambda m: fields[m.group(1)], JOB_SKELETON.read_text())
    return exercise["folder"] / "job.sbatch", text


FOLDER_MAKEFILE = """\
# `make grade` in this folder grades its file with the course's top Makefile, as
# `make grade EX={name}` there does. FILE=, JSON= and TASK= work here too, relative to
# this folder. (Generated by scripts/make_starters.py.)
TOP := $(abspath $(CURDIR)/{up})
grade:
\t@$(MAKE) --no-print-directory -C "$(TOP)" grade EX={name} \\
\t\tFILE="$(abspath $(or $(FILE),{default}))" \\
\t\t$(if $(JSON),JSON="$(abspath $(JSON))") $(if $(TASK),TASK=$(TASK))
.PHONY: grade
"""


def folder_makefile_for(exercise: dict) -> tuple[Path, str]:
    """A Makefile in the exercise folder, so that `make grade` works from there too."""
    depth = len(exercise["folder"].relative_to(REPO).parts)
    starter = exercise["starter"]
    text = FOLDER_MAKEFILE.format(name=exercise["name"], up="/".join([".."] * depth),
                                  default="." if starter == "." else starter)
    return exercise["folder"] / "Makefile", text


def generated_files(exercise: dict) -> list[tuple[Path, str]]:
    return [*starters_for(exercise), job_file_for(exercise), folder_makefile_for(exercise)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a starter is stale")
    args = parser.parse_args(argv)
    stale = []
    for exercise in all_exercises():
        for path, text in generated_files(exercise):
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(path.relative_to(REPO))
            else:
                path.write_text(text)
                print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print("stale starters (run `python scripts/make_starters.py`): "
              + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
