"""The site's table of contents, read from myst.yml (the only place it lives).

Used by docs/conf.py (to build the site), scripts/build-site (to name missing pages
before Sphinx starts) and tests/test_site.py (to know which pages to check).

    python scripts/site_toc.py --check    # exit 1, naming them, if toc pages are missing
    python scripts/site_toc.py            # list the toc's files, in order
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
MYST_YML = REPO / "myst.yml"


@dataclass(frozen=True)
class Section:
    """A run of toc files shown together: a titled toc entry (its title is the caption)
    or consecutive top-level files (no caption)."""

    caption: str | None
    files: tuple[str, ...]


@dataclass(frozen=True)
class Toc:
    title: str
    sections: tuple[Section, ...]

    @property
    def files(self) -> list[str]:
        """Every page, in reading order (the first one is the home page)."""
        return [file for section in self.sections for file in section.files]

    def missing(self, repo: Path = REPO) -> list[str]:
        return [file for file in self.files if not (repo / file).is_file()]


def read_toc(path: Path = MYST_YML) -> Toc:
    """The title and toc of myst.yml's `project`, with a clear error when there are none."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    project = data.get("project")
    if not isinstance(project, dict) or not project.get("toc"):
        raise ValueError(f"{path}: no project.toc (the site's table of contents)")
    return Toc(title=str(project.get("title") or "Site"), sections=sections_of(project["toc"]))


def sections_of(toc: list) -> tuple[Section, ...]:
    """Top-level files gather into uncaptioned sections; each titled entry is a section
    with its title as caption. Deeper levels are flattened into their section: the site
    shows two levels."""
    sections: list[Section] = []
    loose: list[str] = []
    for entry in toc:
        if "file" in entry and not entry.get("children"):
            loose.append(entry["file"])
            continue
        if loose:
            sections.append(Section(None, tuple(loose)))
            loose = []
        if "children" not in entry:
            raise ValueError(f"myst.yml: a toc entry with neither file nor children: {entry}")
        sections.append(Section(entry.get("title"), tuple(files_below([entry]))))
    if loose:
        sections.append(Section(None, tuple(loose)))
    return tuple(sections)


def files_below(entries: list) -> list[str]:
    """Every file of a toc subtree, depth first (a file with children comes first)."""
    files: list[str] = []
    for entry in entries:
        if "file" in entry:
            files.append(entry["file"])
        files.extend(files_below(entry.get("children", [])))
    return files


def docname(file: str) -> str:
    """Sphinx's name for a page: its path from the repository root without the suffix."""
    return Path(file).with_suffix("").as_posix()


def main(argv: list[str]) -> int:
    toc = read_toc()
    if argv == ["--check"]:
        missing = toc.missing()
        for file in missing:
            print(f"myst.yml names a page that does not exist: {file}", file=sys.stderr)
        return 1 if missing else 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(toc.files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
