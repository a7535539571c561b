"""The graders have teeth: every reference solution gets full marks, every known-wrong
solution loses the points of exactly the task it breaks, and (tests/test_doc_scenarios.py,
through each exercise README's `make grade`) every untouched starter gets almost nothing."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

import grade as grade_script
from make_starters import (REPO, all_exercises, function_file, function_source,
                           generated_files)

pytestmark = [pytest.mark.exercises, pytest.mark.integration]

@dataclasses.dataclass
class Graded:
    returncode: int | str
    stdout: str


EXERCISES = all_exercises()
MUTANTS = [pytest.param(ex, m, id=f"{ex['name']}: {m['name']}")
           for ex in EXERCISES if (ex["folder"] / "mutants.toml").exists()
           for m in tomllib.loads((ex["folder"] / "mutants.toml").read_text())["mutant"]]


@pytest.fixture(scope="session", autouse=True)
def shared_reference_runs(tmp_path_factory):
    """One folder for the graders' runs of the reference kits, so that grading an exercise
    many times (reference, starter, every mutant) runs each reference once; and graders
    forked from a process that imported torch once (scripts/grade.py, preload_graders)."""
    os.environ["GRADER_CACHE_DIR"] = str(tmp_path_factory.mktemp("grader-cache"))
    grade_script.preload_graders()
    yield
    grade_script.PRELOADED = None
    del os.environ["GRADER_CACHE_DIR"]


def exercise_id(exercise: dict) -> str:
    """ex01-basic-checkpoint, r-ex01-basic-checkpoint, ..."""
    return exercise["name"] + exercise["folder"].name.removeprefix(exercise["name"].split("-")[-1])


def grade(exercise: dict, learner_file, tmp_path, tasks=()) -> tuple[dict, Graded]:
    """`scripts/grade.py exNN --file F --json J`, the instructors' contract, run in this
    process (its graders run in processes of their own)."""
    result_file = tmp_path / "grade.json"
    only = [arg for number in tasks for arg in ("--task", str(number))]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            code = grade_script.main([exercise["name"], "--file", str(learner_file),
                                      "--json", str(result_file), *only])
        except SystemExit as stop:  # the grader could not run: its message
            code = stop.code
    run = Graded(code, printed.getvalue())
    assert run.stdout.strip().splitlines()[-1].startswith("score: "), f"{run.stdout}\n{code}"
    return json.loads(result_file.read_text()), run


@pytest.mark.parametrize("exercise", EXERCISES, ids=exercise_id)
def test_committed_starter_is_generated_from_the_template(exercise):
    # The starter (one file, or one per function for MATLAB), and the job file.
    for path, text in generated_files(exercise):
        assert path.exists() and path.read_text() == text, (
            f"{path.relative_to(REPO)} is stale: run `python scripts/make_starters.py`")


@pytest.mark.parametrize("exercise", EXERCISES, ids=exercise_id)
def test_reference_solution_gets_full_marks(exercise, tmp_path):
    result, run = grade(exercise, REPO / exercise["template"], tmp_path)
    assert result["earned"] == result["possible"], run.stdout
    assert run.returncode == 0
    assert run.stdout.strip().endswith(f"score: {result['possible']}/{result['possible']}")


NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
TOPIC_PAGES = {"ex01": "docs/basic-checkpointing.md", "ex02": "docs/distributed-checkpointing.md",
               "ex03": "docs/preemption.md", "ex04": "docs/auto-resume.md"}
COUNTED = re.compile(r"\b(%s) functions" % "|".join(NUMBER_WORDS))


def pages_that_count_functions(exercise: dict) -> list[Path]:
    pages = [exercise["folder"] / "README.md"]
    if exercise["name"] in TOPIC_PAGES:
        pages.append(REPO / TOPIC_PAGES[exercise["name"]])
    return [page for page in pages if page.exists() and COUNTED.search(page.read_text())]


@pytest.mark.parametrize("exercise", [ex for ex in EXERCISES if pages_that_count_functions(ex)],
                         ids=exercise_id)
def test_the_pages_count_the_functions_to_write(exercise):
    """"Seven functions" in a README or the topic page is the number the starter leaves
    to write, as exercise.toml lists them."""
    to_write = sum(len(task["functions"]) for task in exercise["tasks"])
    for page in pages_that_count_functions(exercise):
        said = [NUMBER_WORDS.index(word) for word in COUNTED.findall(page.read_text())]
        assert said == [to_write] * len(said), (
            f"{page.relative_to(REPO)} says {said} functions; the starter has {to_write}")


def task_sources(kit, exercise: dict) -> dict[int, list[str]]:
    """The source of every task's functions, per task number, in a kit: a file, or a
    folder of one function per file (MATLAB)."""
    language = exercise["language"]
    return {task["number"]: [function_source(function_file(kit, name, language).read_text(),
                                             name, language)
                             for name in task["functions"]] for task in exercise["tasks"]}


@pytest.mark.parametrize("exercise, mutant", MUTANTS)
def test_known_wrong_solution_loses_exactly_its_task(exercise, mutant, tmp_path):
    template = REPO / exercise["template"]
    if template.is_dir():
        # A kit of one function per file (MATLAB): the mutant changes mutant["file"] in a
        # copy of the whole kit folder, which is graded as the learner's folder.
        wrong = tmp_path / "kit"
        shutil.copytree(template, wrong)
        changed_file = wrong / mutant["file"]
    else:
        wrong = changed_file = tmp_path / exercise["starter"]
        shutil.copy(template, wrong)
    reference = changed_file.read_text()
    assert reference.count(mutant["find"]) == 1, f"mutant {mutant['name']!r} no longer applies"
    changed_file.write_text(reference.replace(mutant["find"], mutant["replace"]))

    if exercise.get("isolated_tasks"):
        # Every check of these graders runs a hybrid kit: the reference with only the
        # graded task's functions taken from the learner's file. Where a task's functions
        # are untouched, its kit IS the reference kit, which gets full marks (proved
        # above), so only the mutated task needs grading.
        changed = {n for n, code in task_sources(wrong, exercise).items()
                   if code != task_sources(template, exercise)[n]}
        assert changed == {mutant["task"]}, (
            f"{mutant['name']!r} changes the functions of tasks {sorted(changed)}, "
            f"not only those of task {mutant['task']}")
        result, run = grade(exercise, wrong, tmp_path, tasks=[mutant["task"]])
    else:
        result, run = grade(exercise, wrong, tmp_path)
    lost = {t["task"] for t in result["tasks"] if t["earned"] < t["possible"]}
    assert run.returncode == 1, "below full marks, grade.py exits 1 (scripts and CI read it)"
    assert lost == {mutant["task"]}, (
        f"{mutant['name']!r} should lose points in task {mutant['task']} only; "
        f"lost in {sorted(lost) or 'none'}:\n{run.stdout}")


def test_a_check_that_cannot_run_here_is_named_and_costs_nothing(tmp_path):
    """Without strace (a cluster node may lack it), ex01's system-call check cannot run:
    the report says so, and the task is scored on the checks that did run."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no strace on it
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "grade.py"), "ex01", "--file",
                          str(REPO / "templates" / "checkpoint_utils.py"), "--task", "3"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert "Task 3, not checked on this machine" in run.stdout, run.stdout + run.stderr
    assert "strace is not installed" in run.stdout
    assert run.stdout.strip().endswith("score: 25/25"), run.stdout
    assert run.returncode == 0


@pytest.mark.parametrize("folder, file", [
    ("exercises/ex01-basic-checkpoint", "../../templates/checkpoint_utils.py"),
    ("r/exercises/ex01-basic-checkpoint", "../../checkpoint.R"),
])
def test_make_grade_works_inside_an_exercise_folder(folder, file):
    """Learners run `make grade` where their file is; FILE= is relative to that folder."""
    env = {k: v for k, v in os.environ.items()  # not a sub-make of `make test`
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    run = subprocess.run(["make", "grade", "TASK=1", f"FILE={file}"], cwd=REPO / folder,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("score: 25/25"), run.stdout + run.stderr
