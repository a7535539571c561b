"""Docs that cannot lie: every shell command a page shows is run by a test exactly as
shown (tests/doc_commands.py says how), or its block says why not; every --flag a
command passes exists in that program."""
from __future__ import annotations

import ast
import re
import shlex
import signal
from pathlib import Path

import pytest

from doc_commands import REPO, all_shown_commands

TESTS = Path(__file__).resolve().parent


def constant_value(node: ast.AST, known: dict[str, object]) -> object:
    """A literal, or a tuple or list of literals and names of module constants."""
    if isinstance(node, ast.Name):
        return known[node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [constant_value(item, known) for item in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    return ast.literal_eval(node)


def module_strings(tree: ast.Module) -> dict[str, object]:
    """Module-level NAME = "text", ("a", "b") or [(PAGE, COMMAND), ...] assignments."""
    values: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = constant_value(node.value, values)
            except (KeyError, ValueError):
                pass
    return values


def commands_the_tests_run() -> set[tuple[str, str]]:
    """(page, command) of every ``shown(page or pages, command)`` call in the tests whose
    arguments are written out, and of the (pages, command, ...) rows of module-level lists
    named ``..._SHOWN`` (a parametrized test passes each row to ``shown``)."""
    found = set()
    for path in TESTS.glob("test_*.py"):
        tree = ast.parse(path.read_text())
        names = module_strings(tree)
        for name, rows in names.items():
            for pages, command, *_ in rows if name.endswith("_SHOWN") else ():
                found.update((page, command) for page in
                             ((pages,) if isinstance(pages, str) else pages))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "shown"):
                continue
            try:  # a call with a parameter's values is counted by its _SHOWN list
                page_node, command_node = node.args
                pages = names[page_node.id] if isinstance(page_node, ast.Name) \
                    else ast.literal_eval(page_node)
                command = names[command_node.id] if isinstance(command_node, ast.Name) \
                    else ast.literal_eval(command_node)
            except (KeyError, ValueError):
                continue
            for page in (pages,) if isinstance(pages, str) else pages:
                found.add((page, command))
    return found


def test_every_shown_command_runs_in_a_test_or_says_why_not():
    run = commands_the_tests_run()
    commands = all_shown_commands()
    assert len(commands) > 50, "the pages' command blocks were not found"
    missing = [f"{c.page}:{c.line}: {c.text}" for c in commands
               if c.not_run_because is None and (c.page, c.text) not in run]
    assert not missing, (
        "commands a page shows that no test runs: run each in a test through "
        "doc_commands.shown(page, command), or put a line `# not run by the tests: "
        "<why>` above it in its block:\n" + "\n".join(missing))
    shown = {(c.page, c.text) for c in commands}
    stale = sorted(run - shown)
    assert not stale, f"tests name commands no page shows: {stale}"


def test_a_reason_is_given_for_every_command_not_run():
    vague = [f"{c.page}:{c.line}" for c in all_shown_commands()
             if c.not_run_because is not None and len(c.not_run_because.split()) < 3]
    assert not vague, f"say why these commands are not run (a few words at least): {vague}"


# ------------------------------------------------------------------ flags that exist
ADD_ARGUMENT = re.compile(r"add_argument\(\s*\"(--[\w-]+)\"(?:,\s*\"(--[\w-]+)\")?")
SIBLING_IMPORT = re.compile(r"^from (\w+) import", re.MULTILINE)
PROGRAM_FOLDERS = ("templates", "scripts", "examples/existing-script", "examples/keras-fit")


def program_flags(program: Path) -> set[str]:
    """The flags a program's argparse accepts, with those of the parser it imports from
    a file beside it (train_tf_multiworker.py uses train_tf.py's)."""
    source = program.read_text()
    flags = {flag for pair in ADD_ARGUMENT.findall(source) for flag in pair if flag}
    for module in SIBLING_IMPORT.findall(source):
        sibling = program.with_name(f"{module}.py")
        if sibling.exists() and "parse_args" in source.split(f"from {module} import")[1][:400]:
            flags |= program_flags(sibling)
    return flags | {"--help"}


def python_programs(command: str):
    """(program file, flags passed to it) for each `python X.py ...` in ``command``."""
    words = shlex.split(re.sub(r"<[^>]+>", "X", command), comments=True)
    for i, word in enumerate(words):
        if not word.endswith(".py"):
            continue
        candidates = [REPO / folder / Path(word).name for folder in PROGRAM_FOLDERS]
        program = next((path for path in candidates if path.exists()), None)
        if program is None:
            continue  # the reader's own script (my_train.py)
        flags = []
        for rest in words[i + 1:]:
            if rest in ("&&", "||", ";", "|", "&", "--") or rest.endswith(";"):
                break  # the next command, or (after --) the one chaos_bench.py runs
            if rest.startswith("--"):
                flags.append(rest.split("=")[0])
        yield program, flags


@pytest.mark.parametrize("command", [c for c in all_shown_commands()
                                     if any(True for _ in python_programs(c.text))],
                         ids=lambda c: f"{c.page}:{c.line}")
def test_every_flag_a_command_passes_exists(command):
    for program, flags in python_programs(command.text):
        unknown = sorted(set(flags) - program_flags(program))
        assert not unknown, f"{program.name} has no {unknown}: `{command.text}`"


# ------------------------------------------------------------ the one exit-code table
EXIT_ROW = re.compile(r"^\| (\d+) \| `(EXIT_\w+)` \|", re.MULTILINE)
EXIT_CONSTANT = re.compile(r"^(EXIT_\w+) = (128 \+ signal\.(SIG\w+)|\d+)", re.MULTILINE)


def exit_constants() -> dict[str, int]:
    """Every EXIT_NAME = code of the Python kits."""
    found = {}
    for path in (REPO / "templates").glob("*.py"):
        for name, value, signal_name in EXIT_CONSTANT.findall(path.read_text()):
            code = 128 + getattr(signal, signal_name) if signal_name else int(value)
            assert found.setdefault(name, code) == code, f"{name} differs in {path.name}"
    return found


def test_the_exit_code_table_names_every_code_of_the_kits():
    """docs/rules.md holds the one table of exit codes; the other pages link to it."""
    table = {name: int(code) for code, name in
             EXIT_ROW.findall((REPO / "docs" / "rules.md").read_text())}
    assert table == exit_constants(), (
        "docs/rules.md's exit-code table and the EXIT_* constants of templates/ differ")
