"""Sphinx configuration of the course site, built offline (scripts/build-site, make site).

The site's title and table of contents live only in ../myst.yml, which mystmd reads too;
this file reads them from there. Sphinx runs with the repository root as its source
folder (so that the notebooks/ beside docs/ are pages too) and this folder as its
configuration folder:

    python -m sphinx -b html -c docs . out/site

Only the pages named in the toc are read; everything else in the repository (templates,
exercises, .venv, out, README files, ...) is left out. The toctree is added to the home
page while it is read, so no page has to repeat the toc.

SITE_ALLOW_MISSING=1 (scripts/build-site --allow-missing) builds whatever toc pages exist
yet, for work in progress; without it, a toc page that is missing is an error.
"""
from __future__ import annotations

import html
import os
import re
import sys
from pathlib import Path

import yaml
from sphinx import addnodes
from sphinx.errors import ConfigError
from sphinx.util import logging

CONF_DIR = Path(__file__).resolve().parent
REPO = CONF_DIR.parent
sys.path.insert(0, str(REPO / "scripts"))
from site_toc import docname, read_toc  # noqa: E402  (scripts/ is not a package)

LOGGER = logging.getLogger(__name__)
ALLOW_MISSING = os.environ.get("SITE_ALLOW_MISSING", "") not in ("", "0")

TOC = read_toc(REPO / "myst.yml")
MISSING_FILES = TOC.missing(REPO)
if MISSING_FILES and not ALLOW_MISSING:
    raise ConfigError(
        "myst.yml names pages that do not exist: " + ", ".join(MISSING_FILES)
        + " (scripts/build-site --allow-missing builds the others)"
    )
PAGES = [file for file in TOC.files if file not in MISSING_FILES]
# The first toc entry is the home page. While it is being written, the first Markdown
# page that exists stands in (the toctree is added to a Markdown source).
HOME_FILE = next((file for file in PAGES if file.endswith(".md")), None)
if HOME_FILE is None:
    raise ConfigError("no Markdown page of myst.yml's toc exists yet")


# ---------------------------------------------------------------- Sphinx settings

project = TOC.title
html_title = project
author = ""
copyright = ""
root_doc = docname(HOME_FILE)

# Read only the toc's pages. Every top-level folder without a toc page is excluded as a
# whole, so Sphinx never walks .venv or out/.
include_patterns = PAGES
exclude_patterns = sorted(
    entry.name
    for entry in REPO.iterdir()
    if not any(Path(file).parts[0] == entry.name for file in PAGES)
) + ["**/.ipynb_checkpoints", "**/_build"]

extensions = ["myst_nb", "sphinx_book_theme"]

# MyST: the syntax the pages use. No dollarmath/amsmath: the pages avoid math, and math
# would load MathJax.
myst_enable_extensions = [
    "attrs_block",
    "attrs_inline",
    "colon_fence",
    "deflist",
    "fieldlist",
    "html_admonition",
    "html_image",
    "substitution",
    "tasklist",
]
myst_title_to_header = True  # a front-matter `title:` is the page's first heading
myst_heading_anchors = 4  # `page.md#a-heading` links resolve, as they do in mystmd

# Notebooks show their stored outputs; nothing runs at build time.
nb_execution_mode = "off"
nb_ipywidgets_js = {}  # the default loads require.js and the widget manager from CDNs

# Offline: code is highlighted by Pygments at build time, and no page loads anything
# from another host.
pygments_style = "sphinx"
html_theme = "sphinx_book_theme"
html_theme_options = {
    "home_page_in_toc": True,  # the sidebar lists every toc entry, the home page too
    "show_toc_level": 2,
    "use_download_button": True,
    "use_fullscreen_button": False,
    "use_repository_button": False,
}
html_context = {"default_mode": "auto"}  # light or dark as the reader's system prefers
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"  # else browsers ask for /favicon.ico, which is not there
html_last_updated_fmt = None
html_show_sphinx = False


# ---------------------------------------------------------------- the toctree


def toctree_markdown(home: str) -> str:
    """MyST toctree directives for the toc's sections, without the home page itself.
    They are hidden: the sidebar and the previous/next links show them."""
    blocks = []
    for section in TOC.sections:
        caption = section.caption
        entries = [f"/{docname(file)}" for file in section.files if file != home and file in PAGES]
        if not entries:
            continue
        options = [":hidden:"] + ([f":caption: {caption}"] if caption else [])
        blocks.append("```{toctree}\n" + "\n".join(options) + "\n\n" + "\n".join(entries) + "\n```")
    return "\n\n" + "\n\n".join(blocks) + "\n"


def add_toctree(app, name: str, source: list[str]) -> None:
    """Append the toc to the home page's source as it is read (Sphinx's source-read)."""
    if name == root_doc:
        source[0] += toctree_markdown(HOME_FILE)


FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)


def drop_heading_that_repeats_the_title(app, name: str, source: list[str]) -> None:
    """A page with a front-matter `title:` whose first line is the same `# Title` would
    show its title twice (myst_title_to_header makes a heading of the front-matter
    title): the repeated heading is left out, as mystmd shows the title once."""
    front = FRONT_MATTER.match(source[0])
    if front is None or app.env.doc2path(name).suffix != ".md":
        return
    try:
        title = (yaml.safe_load(front.group(1)) or {}).get("title")
    except yaml.YAMLError:
        return  # myst-parser reports the broken front matter itself
    if not title:
        return
    body = source[0][front.end():]
    first = re.match(r"\s*^# +(.+?)\s*$\n?", body, re.MULTILINE)
    if first and first.group(1) == str(title).strip():
        source[0] = source[0][:front.end()] + body[first.end():]


def link_outside_site_as_download(app, doctree) -> None:
    """A link from a page to a repository file that is not a page of the site (an
    exercise's README.md, say) becomes a download of that file, as mystmd makes it,
    instead of a missing page. Runs before Sphinx collects the downloads of the page."""
    for xref in list(doctree.findall(addnodes.pending_xref)):
        if xref.get("refdomain") != "doc" or xref.get("reftype") != "myst":
            continue
        target = xref["reftarget"]
        if target in app.env.found_docs:
            continue
        source = next((target + suffix for suffix in app.config.source_suffix
                       if (REPO / (target + suffix)).is_file()), None)
        if source is None:
            continue  # a missing page: Sphinx warns about it
        download = addnodes.download_reference(
            "", "", *xref.children, refdomain=None, reftype="myst", refexplicit=True,
            reftarget="/" + source, refdoc=xref.get("refdoc"),
        )
        xref.replace_self(download)


def refuse_mathjax(app, pagename, templatename, context, doctree) -> None:
    """MathJax would come from a CDN, which the offline site cannot reach: a page with
    math is a warning (an error under -W), and the script is left out."""
    scripts = context.get("script_files", [])
    mathjax = [script for script in scripts if "mathjax" in str(script).lower()]
    if mathjax:
        LOGGER.warning("%s has math, which needs MathJax from a CDN; the site avoids math", pagename)
        context["script_files"] = [script for script in scripts if script not in mathjax]


def write_root_redirect(app, exception) -> None:
    """The home page is docs/index.html; out/site/index.html sends a visitor of the bare
    address there."""
    if exception is not None or app.builder.format != "html" or root_doc == "index":
        return
    target = f"{root_doc}.html"
    title = html.escape(project)
    Path(app.outdir, "index.html").write_text(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{title}</title>"
        f"<meta http-equiv=\"refresh\" content=\"0; url={target}\"></head>"
        f"<body><a href=\"{target}\">{title}</a></body></html>\n",
        encoding="utf-8",
    )


def setup(app):
    app.connect("doctree-read", link_outside_site_as_download, priority=400)
    app.connect("build-finished", write_root_redirect)
    app.connect("source-read", drop_heading_that_repeats_the_title)
    app.connect("source-read", add_toctree)
    app.connect("html-page-context", refuse_mathjax)
    if MISSING_FILES:
        print("conf.py: building without the toc pages that do not exist yet: " + ", ".join(MISSING_FILES))
