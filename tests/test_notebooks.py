"""The instructors' notebooks (notebooks/*.ipynb): each one runs top to bottom under nbval
and gives the outputs stored in it, and the stored outputs are clean.

Why strict nbval with a sanitize file, not --nbval-lax: in strict mode every code cell's
output is compared unless the cell opts out, so a cell that starts printing something else
("bitwise identical: False", an exit code 1 instead of 75, a new warning) fails the test,
also in cells nobody thought of marking. The cells whose output truly varies (the step a
signal lands on, the kit's source code, which other people edit) opt out one by one with
`# NBVAL_IGNORE_OUTPUT` and a reason, and notebooks/nbval-sanitize.cfg hides the few
values that change inside otherwise fixed output (durations, hashes, temp paths, versions,
TensorFlow's C++ log lines). With --nbval-lax only the cells marked NBVAL_CHECK_OUTPUT
would be compared, and a new cell would be checked for nothing but not raising.
nbval 0.11 never compares image/png or image/jpeg data (only with --nbdime), so the plots'
PNG bytes, which vary, are not compared; their text/plain part ("<Figure ...>") is.

Two failures nbval cannot see, checked here on the stored and on freshly executed outputs:
the Octave kernel reports `error: ...` as ordinary output, and IRkernel shows an R error as
a stream or as an error output depending on where it happens.

nbval runs here with each kernel started in the repository's top folder (the plugin
tests/nbval_kernel_in_repository_root.py); Jupyter starts it in notebooks/. The notebooks
find the kit from either.

To store new outputs after changing a notebook (from the repository root):
    .venv/bin/python scripts/execute_notebooks.py notebooks/01-basic-checkpoint.ipynb
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_command

pytestmark = [pytest.mark.notebooks, pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SANITIZE = NOTEBOOKS / "nbval-sanitize.cfg"
# torch's generic kernels and one thread: float results differ in their last bits from
# this CPU's vector kernels, as they would on another CPU.
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}


def notebooks_in_table_of_contents() -> list[str]:
    """The notebook paths listed in myst.yml (the site's table of contents)."""
    text = (REPO / "myst.yml").read_text()
    return re.findall(r"file:\s*(notebooks/\S+\.ipynb)", text)


NOTEBOOK_PATHS = notebooks_in_table_of_contents()
KERNEL_OF = {"python3": "python", "ir": "R", "octave": "octave"}


def read_notebook(path: Path) -> dict:
    return json.loads(path.read_text())


def kernel_name(notebook: dict) -> str:
    return notebook["metadata"]["kernelspec"]["name"]


def output_texts(notebook: dict) -> list[tuple[int, str]]:
    """(cell number, text) of every text output: streams, text/plain, error outputs."""
    found = []
    for number, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []):
            kind = output["output_type"]
            if kind == "stream":
                found.append((number, "".join(output["text"])))
            elif kind == "error":
                found.append((number, "\n".join([f"{output['ename']}: {output['evalue']}",
                                                 *output.get("traceback", [])])))
            else:
                for mime, value in output.get("data", {}).items():
                    if mime.startswith("text/"):
                        found.append((number, "".join(value)))
    return found


# Lines that mean a notebook failed although nbval may pass it.
ERROR_LINES = {
    "python3": [re.compile(r"Traceback \(most recent call last\)")],
    # The Octave kernel prints an error as ordinary output: "error: boom".
    "octave": [re.compile(r"(?m)^error: ")],
    # An R error: "Error in f(): ..." or "Error: ..." (also inside IRkernel's display).
    "ir": [re.compile(r"(?m)^Error( in |:)")],
}


def error_problems(notebook: dict) -> list[str]:
    """Error outputs, and lines that show an error the kernel did not report as one."""
    problems = []
    for number, cell in enumerate(notebook["cells"]):
        for output in cell.get("outputs", []):
            if output["output_type"] == "error":
                problems.append(f"cell {number}: error output {output['ename']}: "
                                f"{output['evalue']}")
    patterns = ERROR_LINES.get(kernel_name(notebook), []) + ERROR_LINES["python3"]
    for number, text in output_texts(notebook):
        for pattern in patterns:
            if match := pattern.search(text):
                line = text[match.start():].splitlines()[0]
                problems.append(f"cell {number}: {line!r}")
    return problems


def machine_paths() -> list[str]:
    """Absolute paths of this machine that must never appear in a stored output."""
    paths = {str(REPO), str(Path.home()), "/tmp/", "/work/", "/root/"}
    return sorted(p for p in paths if p not in ("/", ""))


def test_every_notebook_of_the_table_of_contents_exists():
    assert len(NOTEBOOK_PATHS) == 8, f"myst.yml lists {NOTEBOOK_PATHS}"
    missing = [path for path in NOTEBOOK_PATHS if not (REPO / path).is_file()]
    assert not missing, f"listed in myst.yml but not in the repository: {missing}"
    unlisted = sorted(p.relative_to(REPO).as_posix() for p in NOTEBOOKS.glob("*.ipynb")
                      if p.relative_to(REPO).as_posix() not in NOTEBOOK_PATHS)
    assert not unlisted, f"notebooks missing from myst.yml's table of contents: {unlisted}"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS)
def test_stored_outputs_are_clean(path):
    """Every code cell was run and stored its output; no errors, no machine paths."""
    notebook = read_notebook(REPO / path)
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    unrun = [i for i, c in enumerate(code_cells) if c.get("execution_count") is None]
    assert not unrun, f"{path}: code cells {unrun} were never run: store their outputs"
    assert code_cells[-1].get("outputs"), f"{path}: the last code cell shows no result"
    problems = error_problems(notebook)
    for number, text in output_texts(notebook):
        for machine_path in machine_paths():
            if machine_path in text:
                problems.append(f"cell {number}: the output names {machine_path!r}")
    assert not problems, f"{path}:\n" + "\n".join(problems)
    last_cell = notebook["cells"][-1]
    assert last_cell["cell_type"] == "markdown" and "Key points" in "".join(
        last_cell["source"]), f"{path}: the last cell is not the Key points"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS)
def test_printed_kit_source_is_the_kits_current_source(path):
    """A cell that prints kit code with inspect.getsource is not compared by nbval (its
    comments may change), so its stored output would go stale, and the site would show
    old code. It must still be a piece of a template as the template is now: re-run the
    notebook (`.venv/bin/python scripts/execute_notebooks.py NOTEBOOK`) after changing that code."""
    templates = [file.read_text() for file in (REPO / "templates").glob("*.py")]
    stale = []
    for cell in read_notebook(REPO / path)["cells"]:
        if cell["cell_type"] == "code" and "inspect.getsource(" in "".join(cell["source"]):
            printed = "".join("".join(output.get("text", "")) for output in cell["outputs"]
                              if output.get("output_type") == "stream").strip()
            if not any(printed in text for text in templates):
                stale.append(cell.get("id", "?"))
    assert not stale, f"{path}: cells {stale} show kit code that is no longer in templates/"


# An exercise as the notebooks and `make grade EX=...` name it, and the folder it lives in.
EXERCISE_NAME = re.compile(r"\b((?:r-|matlab-)?ex0\d)\b")
EXERCISE_ROOT = {"": "exercises", "r-": "r/exercises", "matlab-": "matlab/exercises"}


def exercise_folders(name: str) -> list[Path]:
    track, number = re.fullmatch(r"((?:r-|matlab-)?)(ex0\d)", name).groups()
    return sorted((REPO / EXERCISE_ROOT[track]).glob(f"{number}-*/README.md"))


@pytest.mark.parametrize("path", NOTEBOOK_PATHS)
def test_learners_predict_try_a_change_see_it_checked_and_find_their_exercise(path):
    """A workshop notebook is not read-only: a markdown cell asks for a prediction before a
    key cell; a code cell has a value marked "try changing this", and that cell or a later
    one checks the outcome against the value and says "as predicted" (in its stored
    output, the unchanged notebook's, and compared by nbval, so it holds on any machine);
    the Key points name the exercise to do next, which exists."""
    cells = read_notebook(REPO / path)["cells"]
    sources = ["".join(cell["source"]) for cell in cells]
    predictions = [i for i, cell in enumerate(cells)
                   if cell["cell_type"] == "markdown" and "**Predict" in sources[i]]
    tries = [i for i, cell in enumerate(cells)
             if cell["cell_type"] == "code" and "try changing this" in sources[i]]
    checks = [i for i, cell in enumerate(cells) if cell["cell_type"] == "code"
              and any(line.startswith("as predicted:")
                      for _, text in output_texts({"cells": [cell]})
                      for line in text.splitlines())]
    assert predictions, f"{path}: no markdown cell asks learners to **Predict** anything"
    assert tries, f"{path}: no code cell has a value marked 'try changing this'"
    unchecked = [i for i in tries if not any(check >= i for check in checks)]
    assert not unchecked, f"{path}: 'try changing this' cells {unchecked} have no check after them"
    ignored = [i for i in checks if "NBVAL_IGNORE_OUTPUT" in sources[i]]
    assert not ignored, f"{path}: check cells {ignored} are not compared by nbval"
    wrong = sorted({i for i, text in output_texts({"cells": cells}) if "NOT as predicted" in text})
    assert not wrong, f"{path}: the stored outputs of cells {wrong} say NOT as predicted"
    named = set(EXERCISE_NAME.findall(sources[-1]))
    assert named, f"{path}: the Key points name no exercise (ex01, r-ex04, ...)"
    missing = [name for name in sorted(named) if len(exercise_folders(name)) != 1]
    assert not missing, f"{path}: names exercises that have no folder: {missing}"


def sanitize_rules() -> list[tuple[re.Pattern, str]]:
    """The (regex, replacement) pairs of nbval-sanitize.cfg, as nbval reads them."""
    lines = [line for line in SANITIZE.read_text().splitlines()
             if line.startswith(("regex:", "replace:"))]
    return [(re.compile(regex.split(":", 1)[1].strip()), replace.split(":", 1)[1].strip())
            for regex, replace in zip(lines[::2], lines[1::2])]


# A number with three or more decimals: a float printed to the last digits it holds.
LONG_FLOAT = re.compile(r"(?<![\w.])-?\d+\.\d{3,}(?:e[-+]?\d+)?\b")


@pytest.mark.parametrize("path", NOTEBOOK_PATHS)
def test_compared_outputs_hold_no_machine_dependent_float(path):
    """The last digits of a computed float depend on the CPU (vector width, thread count):
    a compared cell that prints them passes here and fails on another machine, even when
    this machine's generic kernels happen to give the same digits. A compared cell prints
    what the lesson is about (a comparison, a step, an exit code, a rounded value)."""
    rules = sanitize_rules()
    notebook = read_notebook(REPO / path)
    found = []
    for number, text in output_texts(notebook):
        if "NBVAL_IGNORE_OUTPUT" in "".join(notebook["cells"][number]["source"]):
            continue
        for pattern, replacement in rules:
            text = pattern.sub(replacement, text)
        found += [f"cell {number}: {match.group(0)!r} in {line.strip()!r}"
                  for line in text.splitlines() for match in LONG_FLOAT.finditer(line)]
    assert not found, (f"{path}: compared outputs print floats to their last digits; round "
                       "them, print the comparison instead, or mark the cell "
                       "NBVAL_IGNORE_OUTPUT with a reason:\n" + "\n".join(found))


def require_kernel(kernel: str) -> None:
    if kernel == "ir":
        require_command("R", "scripts/install-debian-packages r")
    if kernel == "octave":
        require_command("octave-cli", "scripts/install-debian-packages octave")


def run_nbval(notebook: Path, kernel: str, tmp_path: Path,
              timeout: float = 240) -> subprocess.CompletedProcess:
    """Run one notebook under strict nbval in a pytest of its own (nbval's cells are
    pytest items; a nested run keeps them out of this session's collection), with its
    kernel started in the repository's top folder (tests/nbval_kernel_in_repository_root.py)."""
    command = [sys.executable, "-m", "pytest", "--nbval", str(notebook),
               "--nbval-sanitize-with", str(SANITIZE), "-p", "no:cacheprovider",
               "-p", "nbval_kernel_in_repository_root",
               "-o", "addopts=", "-q", "--nbval-cell-timeout", "120"]
    if kernel == "python3":
        command.append("--nbval-current-env")  # this interpreter, the one with the kit's packages
    # The stored outputs were made with torch's fastest kernels for this CPU; compare them
    # under its generic kernels and one thread. Those end a run with other last bits, the
    # way another CPU or a laptop would, so an output that carries such bits fails here,
    # not on an instructor's machine.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **OTHER_CPU,
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"),
                                          *filter(None, [os.environ.get("PYTHONPATH")])]),
           "NBVAL_KERNEL_CWD_LOG": str(tmp_path / "kernel-cwd.txt"),
           # nbval kills the kernel, so a notebook's temporary folder, which the kernel
           # removes when it exits normally, stays: keep it among this test's files.
           "TMPDIR": str(tmp_path)}
    # The kernels start Rscript, octave-cli, python: the venv's bin first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("path", NOTEBOOK_PATHS)
def test_notebook_started_in_the_repository_root_gives_its_stored_outputs(path, tmp_path):
    """Each notebook under strict nbval, its kernel started in the repository's top folder,
    not in notebooks/: the notebook must find the kit from there. One run proves both the
    outputs and the start folder; started in notebooks/, as Jupyter starts them, they run
    whenever their outputs are stored (scripts/execute_notebooks.py), and 06 and 07 also
    in test_executed_outputs_show_no_r_or_octave_error."""
    notebook = REPO / path
    kernel = kernel_name(read_notebook(notebook))
    require_kernel(kernel)
    started = time.monotonic()
    result = run_nbval(notebook, kernel, tmp_path)
    seconds = time.monotonic() - started
    print(f"{path}: nbval took {seconds:.1f} s")
    assert result.returncode == 0, (
        f"{path} fails under nbval (exit {result.returncode}, {seconds:.1f} s):\n"
        f"{result.stdout[-12000:]}\n{result.stderr[-3000:]}")
    started_in = (tmp_path / "kernel-cwd.txt").read_text().splitlines()
    assert started_in == [str(REPO)], f"the kernel was started in: {started_in}"
    assert seconds < 120, f"{path} took {seconds:.0f} s under nbval; keep it under a minute"


@pytest.mark.parametrize("path", [p for p in NOTEBOOK_PATHS if "06-r" in p or "07-matlab" in p])
def test_executed_outputs_show_no_r_or_octave_error(path, tmp_path):
    """nbval passes an Octave cell that printed `error: ...` (and an R error printed to a
    stream) when the stored output says the same: execute the notebook afresh and look."""
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    notebook_path = REPO / path
    notebook = nbformat.read(notebook_path, as_version=4)
    require_kernel(kernel_name(notebook))
    client = nbclient.NotebookClient(notebook, timeout=120, allow_errors=True,
                                     resources={"metadata": {"path": str(notebook_path.parent)}})
    client.execute()
    problems = error_problems(json.loads(nbformat.writes(notebook)))
    assert not problems, f"{path}, executed now:\n" + "\n".join(problems)
