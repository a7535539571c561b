"""Copy the framework-free part of the PyTorch kit into the kits of other frameworks.

The preemption flag, the emergency deadline, the safe requeue, the exit codes and the
atomic write are the same rules in every Python track, and are written once, in
templates/checkpoint_utils.py. A kit for another framework (templates/tf_checkpoint_utils.py)
must still work when copied alone, without torch, so it carries a copy of them between two
marker lines. This script writes that copy; a test fails when a copy is stale.

    python scripts/sync_shared_code.py            # rewrite the copies
    python scripts/sync_shared_code.py --check    # exit 1 if a copy is out of date
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "templates" / "checkpoint_utils.py"
TARGETS = [REPO / "templates" / "tf_checkpoint_utils.py"]

# In the order they are written; each is a top-level class, function or assignment.
SHARED_NAMES = [
    "TEMP_PREFIX", "EXIT_FINISHED", "EXIT_REQUEUED", "EXIT_SAVE_TIMEOUT", "EXIT_PREEMPTED",
    "EXIT_STOPPED",
    "CheckpointError", "CorruptCheckpointError", "InvalidJobIdError",
    "HashingFile", "fsync_directory", "_temp_path", "atomic_write_bytes",
    "atomic_write_json",
    "DEFAULT_SIGNALS", "PreemptionHandler", "EmergencyDeadline",
    "_JOB_ID", "slurm_job_id", "requeue_slurm_job", "exit_after_preemption",
]
BEGIN = ("# ----- BEGIN shared code: copied from checkpoint_utils.py by "
         "scripts/sync_shared_code.py.\n# ----- Change it there, not here.\n")
END = "# ----- END shared code\n"


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    return []


def shared_block(source: str = SOURCE.read_text()) -> str:
    """The shared definitions, each with the comment lines right above it."""
    lines = source.splitlines(keepends=True)
    segments = {}
    for node in ast.parse(source).body:
        for name in _defined_names(node):
            start = (node.decorator_list[0].lineno if getattr(node, "decorator_list", None)
                     else node.lineno) - 1
            segments[name] = "".join(lines[start:node.end_lineno])
    missing = [name for name in SHARED_NAMES if name not in segments]
    if missing:
        raise SystemExit(f"{SOURCE.name} no longer defines {missing}: update SHARED_NAMES")
    parts, previous_was_def = [], False
    for name in SHARED_NAMES:
        is_def = not segments[name].startswith(name)  # class/def rather than NAME = ...
        if parts:
            parts.append("\n\n" if is_def or previous_was_def else "")
        parts.append(segments[name])
        previous_was_def = is_def
    return BEGIN + "".join(parts) + END


def synced(target_text: str, block: str, target: Path) -> str:
    if BEGIN not in target_text or END not in target_text:
        raise SystemExit(f"{target}: the BEGIN/END shared-code marker lines are missing")
    head, rest = target_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale copies")
    args = parser.parse_args(argv)
    block, stale = shared_block(), []
    for target in TARGETS:
        text = target.read_text()
        new = synced(text, block, target)
        if new != text:
            stale.append(target)
            if not args.check:
                target.write_text(new)
                print(f"wrote {target.relative_to(REPO)}")
    if args.check and stale:
        print("stale shared code in " + ", ".join(str(t.relative_to(REPO)) for t in stale)
              + ": run python scripts/sync_shared_code.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
