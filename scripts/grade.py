"""Grade an exercise: run its grader against a learner's file and print, per task, the
points earned and, for every failed check, what was done, what was expected and a hint.

    make grade EX=ex01                         # the file in exercises/ex01-*/
    make grade EX=ex01 FILE=~/my_utils.py      # another file
    python scripts/grade.py ex01 --json result.json
    make grade EX=ex01 TASK=2                  # only task 2, while you work on it
    make grade EX=r-ex01                       # the R track's ex01 (r/exercises/ex01-*/)

Exercises are named by number, with the track in front for the other languages: ex01 is
exercises/ex01-*, r-ex04 is r/exercises/ex04-*, matlab-ex01 is matlab/exercises/ex01-*.
A MATLAB exercise's work is a folder of ckpt_*.m files (one function per file): FILE
names that folder, by default the exercise's own.

The last line printed is `score: <earned>/<possible>`; the exit code is 0 only at full
marks. A task's points are shared equally by its checks.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from copy_lists import copy_set
from make_starters import REPO, all_exercises


def find_exercise(name: str) -> dict:
    exercises = all_exercises()
    matches = [e for e in exercises if e["name"] == name]
    if len(matches) != 1:
        known = ", ".join(e["name"] for e in exercises)
        sys.exit(f"grade: no exercise {name!r} (known: {known})")
    return matches[0]


def files_beside_the_learner(exercise: dict) -> list[str]:
    """The template files a check needs beside the learner's file: the list in
    exercise.toml, or, when it names a training script, that script's copy set
    (templates/copy-lists.toml) without the file the learner writes."""
    grade_with = exercise.get("grade_with", [])
    if isinstance(grade_with, str):
        return [name for name in copy_set(grade_with) if name != exercise["starter"]]
    return grade_with


def run_checks(exercise: dict, learner_file: Path, tasks: list[int] | None = None) -> list[dict]:
    """Run the exercise's grader in a fresh Python process; return one record per check.
    With ``tasks``, only the checks of those tasks run."""
    with tempfile.TemporaryDirectory() as scratch:
        record = Path(scratch) / "checks.json"
        env = {**os.environ, "GRADE_FILE": str(learner_file), "GRADE_AS": exercise["starter"],
               "GRADE_WITH": " ".join(files_beside_the_learner(exercise)),
               "GRADE_TEMPLATE": str(REPO / exercise["template"]),
               "GRADE_LANGUAGE": exercise["language"],
               "PYTHONPATH": str(REPO / "scripts")}
        args = [str(exercise["folder"] / "test_grader.py"), "-p", "grading", "--grade-json",
                str(record), "-q", "--no-header", "-p", "no:cacheprovider", "--rootdir", str(REPO)]
        if tasks:
            args += ["--grade-tasks", ",".join(map(str, tasks))]
        printed = run_pytest(args, env, Path(scratch) / "printed.txt")
        if not record.exists():
            sys.exit("grade: the grader itself failed to run:\n" + printed[-6000:])
        return json.loads(record.read_text())


# The test suite grades about 140 files one after the other. A fresh `python -m pytest`
# spends seconds importing torch before its first check: there, preload_graders() makes
# every grading a process forked from one that imported torch and pytest once. Each
# grading is still a process of its own, started from the same clean state.
PRELOADED = None


def preload_graders() -> None:
    global PRELOADED
    PRELOADED = multiprocessing.get_context("forkserver")
    PRELOADED.set_forkserver_preload(["torch", "pytest", "grading"])


def run_pytest(args: list[str], env: dict, printed: Path) -> str:
    """pytest with ``args`` and the environment ``env`` in a new process; what it printed."""
    if PRELOADED is None:
        result = subprocess.run([sys.executable, "-m", "pytest", *args], env=env,
                                capture_output=True, text=True)
        return result.stdout + result.stderr
    process = PRELOADED.Process(target=_pytest_in_this_process, args=(args, env, printed))
    process.start()
    process.join()
    return printed.read_text(errors="replace") if printed.exists() else ""


def _pytest_in_this_process(args: list[str], env: dict, printed: Path) -> None:
    os.environ.clear()
    os.environ.update(env)
    output = os.open(printed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(output, 1)
    os.dup2(output, 2)
    import pytest  # preloaded
    sys.exit(pytest.main(args))


def score(exercise: dict, checks: list[dict], tasks: list[int] | None = None) -> list[dict]:
    rows = []
    for task in exercise["tasks"]:
        if tasks and task["number"] not in tasks:
            continue
        # A check that cannot run on this machine (a tool missing) counts neither way.
        mine = [c for c in checks if c["task"] == task["number"] and not c.get("skipped")]
        passed = sum(c["passed"] for c in mine)
        earned = round(task["points"] * passed / len(mine)) if mine else 0
        if passed < len(mine):
            earned = min(earned, task["points"] - 1)  # full points only when every check passes
        rows.append({"task": task["number"], "title": task["title"], "earned": earned,
                     "possible": task["points"], "checks": mine,
                     "not_run": [c for c in checks if c["task"] == task["number"]
                                 and c.get("skipped")]})
    return rows


def print_report(exercise: dict, learner_file: Path, rows: list[dict]) -> None:
    print(f"Grading {learner_file} for {exercise['folder'].name}: {exercise['title']}\n")
    print(f"  {'task':<48} {'points':>8}")
    for row in rows:
        label = f"{row['task']}. {row['title']}"
        print(f"  {label:<48} {row['earned']:>3} / {row['possible']:<3}")
    for row in rows:
        for check in row["checks"]:
            if not check["passed"]:
                print(f"\nTask {row['task']}, {check['check']}\n  {check['message']}")
        for check in row["not_run"]:
            print(f"\nTask {row['task']}, not checked on this machine: {check['check']}\n"
                  f"  {check['message']}")
    hints = exercise["folder"] / "hints.md"
    if any(r["earned"] < r["possible"] for r in rows):
        print(f"\nHints, numbered like the tasks: {hints.relative_to(REPO)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("exercise", help="ex01, ex02, ..., r-ex01, ...")
    parser.add_argument("--file", type=Path, help="the file to grade, or for MATLAB the "
                        "folder (default: the exercise's own starter, which you edit)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    parser.add_argument("--task", type=int, action="append", dest="tasks",
                        help="grade only this task (repeatable): quicker while you work on it")
    args = parser.parse_args(argv)
    exercise = find_exercise(args.exercise)
    learner_file = (args.file or exercise["folder"] / exercise["starter"]).resolve()
    if not learner_file.exists():
        sys.exit(f"grade: {learner_file} does not exist")

    rows = score(exercise, run_checks(exercise, learner_file, args.tasks), args.tasks)
    print_report(exercise, learner_file, rows)
    earned = sum(r["earned"] for r in rows)
    possible = sum(r["possible"] for r in rows)
    if args.json:
        args.json.write_text(json.dumps({"exercise": exercise["folder"].name,
                                         "file": str(learner_file), "earned": earned,
                                         "possible": possible, "tasks": rows}, indent=2))
    print(f"\nscore: {earned}/{possible}")
    return 0 if earned == possible else 1


if __name__ == "__main__":
    sys.exit(main())
