"""Make each exercise's starter from its reference solution, the template.

The templates are the solutions. An exercise names, in its exercise.toml, the functions a
learner writes; this script copies the template and replaces the body of each of those
functions with `raise NotImplementedError(...)`, keeping the signature and the docstring.
The starter therefore always parses, imports and runs, and no solution is kept twice.

    python scripts/make_starters.py            # write every starter
    python scripts/make_starters.py --check    # exit 1 if a committed starter is stale
"""
from __future__ import annotations

import argparse
import ast
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXERCISES = REPO / "exercises"


def load_exercise(folder: Path) -> dict:
    config = tomllib.loads((folder / "exercise.toml").read_text())
    config["folder"] = folder
    return config


def all_exercises() -> list[dict]:
    return [load_exercise(f) for f in sorted(EXERCISES.glob("ex*")) if (f / "exercise.toml").exists()]


def _find_function(tree: ast.Module, dotted: str) -> ast.FunctionDef:
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


def make_starter(template_source: str, tasks: list[dict], header: str) -> str:
    """The template with the body of every task function replaced by a NotImplementedError."""
    tree = ast.parse(template_source)
    lines = template_source.splitlines()
    cuts = []  # (first body line after the docstring, last line, indent, message), 0-based
    for task in tasks:
        for dotted in task["functions"]:
            function = _find_function(tree, dotted)
            body = function.body
            has_docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                             and isinstance(body[0].value.value, str))
            first = body[1] if has_docstring and len(body) > 1 else body[0]
            start = first.lineno - 1
            if has_docstring and len(body) == 1:
                start = body[0].end_lineno
            indent = " " * first.col_offset
            message = f"Task {task['number']}: {task['title']} (see README.md)"
            cuts.append((start, function.end_lineno - 1, indent, message))
    for start, end, indent, message in sorted(cuts, reverse=True):
        lines[start:end + 1] = [f"{indent}raise NotImplementedError({message!r})"]
    return header + "\n".join(lines) + "\n"


def starter_for(exercise: dict) -> tuple[Path, str]:
    template = REPO / exercise["template"]
    header = (f"# Exercise {exercise['folder'].name}: your file. Generated from "
              f"{exercise['template']} by scripts/make_starters.py.\n"
              "# Implement the functions that raise NotImplementedError (README.md lists the "
              "tasks),\n# then grade your work with: make grade EX="
              f"{exercise['folder'].name.split('-')[0]}\n")
    return exercise["folder"] / exercise["starter"], make_starter(template.read_text(),
                                                                  exercise["tasks"], header)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a starter is stale")
    args = parser.parse_args(argv)
    stale = []
    for exercise in all_exercises():
        path, text = starter_for(exercise)
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
