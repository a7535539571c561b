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


def top_level_sources(path) -> dict[str, str]:
    text = path.read_text()
    return {node.name: ast.get_source_segment(text, node) for node in ast.parse(text).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


# The CHANGE ME blocks that train_fsdp.py (which stands alone) shares with the
# single-process template: the same data and loss, so the two train the same problem.
FSDP_COPIES = ["make_dataset", "augment", "compute_loss"]


@pytest.mark.parametrize("name", FSDP_COPIES)
def test_fsdp_change_me_blocks_are_the_single_process_ones(name):
    single = top_level_sources(TEMPLATES / "train_with_checkpoint.py")
    fsdp = top_level_sources(TEMPLATES / "train_fsdp.py")
    assert fsdp[name] == single[name], (
        f"train_fsdp.py's {name} differs from train_with_checkpoint.py's: change both")


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
    ("tf_checkpoint_utils.py", {"tensorflow", "keras", "numpy"}),  # both come with TF
    ("job_context.py", set()),  # imported by every framework's template
])
def test_each_kit_needs_only_its_framework(kit, allowed):
    assert imported_top_level_modules(TEMPLATES / kit) <= allowed


def bound_at_top_level(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("target", sync_shared_code.TARGETS, ids=lambda p: p.name)
def test_every_name_the_shared_block_uses_exists_in_the_kit_it_was_copied_into(target):
    """The copy brings code, not imports: a module the shared code starts using (mmap, say)
    must be imported by every kit that carries the copy, or its first save fails."""
    import builtins

    block = ast.parse(sync_shared_code.shared_block())
    local = {node.id for node in ast.walk(block)
             if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    local |= {arg.arg for node in ast.walk(block) if isinstance(node, ast.arguments)
              for arg in [*node.posonlyargs, *node.args, *node.kwonlyargs,
                          *filter(None, [node.vararg, node.kwarg])]}
    local |= {node.name for node in ast.walk(block)
              if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.ExceptHandler))
              and node.name}
    used = {node.id for node in ast.walk(block)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    missing = used - local - bound_at_top_level(ast.parse(target.read_text())) - set(dir(builtins))
    assert not missing, f"{target.name} lacks {sorted(missing)} (an import, probably)"
