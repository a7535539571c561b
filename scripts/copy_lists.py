"""The copy lists of templates/: which files a user copies for each script they run.

templates/copy-lists.toml declares them once; the tests, the graders and this script read
it. This script also keeps the table of templates/README.md in step with it:

    python scripts/copy_lists.py            # rewrite the table in templates/README.md
    python scripts/copy_lists.py --check    # exit 1 if the table is out of date
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"
DECLARED = TEMPLATES / "copy-lists.toml"
README = TEMPLATES / "README.md"
BEGIN = "<!-- copy lists: written from copy-lists.toml by scripts/copy_lists.py -->\n"
END = "<!-- end of copy lists -->\n"


def copy_lists() -> dict[str, dict[str, list[str]]]:
    """{script name without .py: {"needs": [...], "extras": [...]}} as declared."""
    return tomllib.loads(DECLARED.read_text())


def copy_set(script: str, *, extras: bool = True) -> list[str]:
    """The files to copy for ``script`` ("train_ddp" or "train_ddp.py"): the script, its
    needs and, unless ``extras`` is False, its extras."""
    name = script.removesuffix(".py")
    declared = copy_lists()[name]
    return [f"{name}.py", *declared["needs"], *(declared["extras"] if extras else [])]


def readme_table() -> str:
    rows = ["| Script | Copy beside it | Extras: each switches on when copied |",
            "|---|---|---|"]
    for name, declared in copy_lists().items():
        needs = ", ".join(f"`{f}`" for f in declared["needs"])
        extras = ", ".join(f"`{f}`" for f in declared["extras"]) or "none"
        rows.append(f"| `{name}.py` | {needs} | {extras} |")
    return BEGIN + "\n".join(rows) + "\n" + END


def readme_with_table(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + readme_table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = parser.parse_args(argv)
    text = README.read_text()
    wanted = readme_with_table(text)
    if args.check:
        if wanted != text:
            print(f"{README.relative_to(REPO)}: the copy lists table is stale: run "
                  "python scripts/copy_lists.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    print(f"wrote {README.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
