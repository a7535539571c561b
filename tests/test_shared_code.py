"""One source of truth across the Python tracks: the framework-free code of the PyTorch kit
(preemption flag, deadline, requeue, exit codes, atomic write) is copied mechanically into
the other kits, and each kit needs nothing but its framework and the standard library."""
from __future__ import annotations

import ast
import sys

import pytest

import sync_shared_code
from conftest import TEMPLATES


def test_copied_shared_code_is_up_to_date(capsys):
    assert sync_shared_code.main(["--check"]) == 0, capsys.readouterr().err


def test_the_shared_block_is_the_source_text():
    block = sync_shared_code.shared_block()
    source = (TEMPLATES / "checkpoint_utils.py").read_text()
    for name in ("class PreemptionHandler", "def requeue_slurm_job", "def atomic_write_bytes"):
        start = source.index(name)
        assert source[start:start + 400] in block


def imported_top_level_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__"}


@pytest.mark.parametrize("kit, allowed", [
    ("checkpoint_utils.py", {"torch", "numpy"}),  # NumPy optional, imported in a try
    ("tf_checkpoint_utils.py", {"tensorflow", "keras"}),  # Keras 3 comes with TF
])
def test_each_kit_needs_only_its_framework(kit, allowed):
    assert imported_top_level_modules(TEMPLATES / kit) <= allowed
