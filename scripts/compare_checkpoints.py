"""Compare two checkpoints bitwise: every tensor with the same dtype, shape and bytes,
every other value equal. The ``meta`` entry (save time, host) is left out.

    python scripts/compare_checkpoints.py run-a/last.pt run-b/last.pt

Exit code 0 when identical, 1 when not (each difference printed). Used by the demo, the
tests and the fault-injection bench to prove that a resumed run is the same run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

IGNORED_KEYS = {"meta"}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: NaN equals NaN, and -0.0 differs from 0.0."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.is_floating_point() or t.is_complex() else t


def state_differences(a, b, where: str = "") -> list[str]:
    """Every place where two nested checkpoint states differ, as readable lines."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: tensor vs {type(b if isinstance(a, torch.Tensor) else a).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"]
        if not torch.equal(_bits(a), _bits(b)):
            changed = (a != b).sum().item() if a.is_floating_point() else "some"
            return [f"{where}: {changed} of {a.numel()} elements differ"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        lines = []
        for key in sorted(set(a) | set(b), key=str):
            if key in IGNORED_KEYS and not where:
                continue
            if key not in a or key not in b:
                lines.append(f"{where}/{key}: only in {'second' if key in b else 'first'}")
            else:
                lines += state_differences(a[key], b[key], f"{where}/{key}")
        return lines
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [line for i, (x, y) in enumerate(zip(a, b))
                for line in state_differences(x, y, f"{where}[{i}]")]
    if a != b and not (a != a and b != b):  # NaN equals NaN here
        return [f"{where}: {a!r} vs {b!r}"]
    return []


def load(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_differences(path_a: str | Path, path_b: str | Path) -> list[str]:
    return state_differences(load(path_a), load(path_b))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    differences = checkpoint_differences(*argv)
    for line in differences:
        print(line)
    print("bitwise identical" if not differences else f"{len(differences)} differences")
    return 0 if not differences else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
