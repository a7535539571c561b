"""The documentation site: built by scripts/build-site without a single Sphinx warning,
then served on 127.0.0.1 and read in a real browser (Debian's chromium, driven by
Selenium), page by page, as a reader would.

Every page of myst.yml's toc is visited once; what the browser saw (requests, links,
rendered elements) is recorded and the tests below check it: nothing fails to load,
nothing is fetched from another host, no internal link or anchor is broken, code is
highlighted, admonitions and notebook outputs render, and the navigation follows the toc.
Screenshots of two pages are kept in out/site-screenshots/.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest

from conftest import REPO
from site_toc import docname, read_toc

pytestmark = [pytest.mark.site, pytest.mark.integration]

SITE = REPO / "out" / "site"
SCREENSHOTS = REPO / "out" / "site-screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_BROWSER = "scripts/install-debian-packages browser (Debian's chromium and chromium-driver)"
# Flags that let chromium run headless as root in a container and keep it from calling
# home, so every request it makes comes from the pages.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
]
ADMONITION = re.compile(
    r"^[`:]{3,}\{(admonition|attention|caution|danger|error|hint|important|note|seealso|tip|warning)\}",
    re.MULTILINE,
)
# Languages Pygments does not colour: their blocks carry no token spans.
PLAIN_LANGUAGES = {"text", "none", "output", "console", "myst-ansi"}

TOC = read_toc(REPO / "myst.yml")


# ------------------------------------------------------------------------ the build


@pytest.fixture(scope="module")
def built_site() -> Path:
    """out/site, built afresh by scripts/build-site (which fails on any Sphinx warning)."""
    result = subprocess.run(
        [str(REPO / "scripts" / "build-site")], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/build-site failed:\n{result.stdout}\n{result.stderr}", pytrace=False)
    return SITE


def page_path(file: str) -> str:
    """The path, under the site's root, of the HTML page built from a toc file."""
    return docname(file) + ".html"


def test_the_build_has_no_warnings_and_every_toc_page(built_site):
    missing = [file for file in TOC.files if not (built_site / page_path(file)).is_file()]
    assert not missing, f"toc pages that were not built: {missing}"


def test_no_page_asks_for_mathjax_or_another_host(built_site):
    """The site works offline: no page names a script, style sheet or image elsewhere
    (links for the reader to follow are fine)."""
    foreign = re.compile(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.IGNORECASE)
    offenders = []
    for page in sorted(built_site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        if foreign.search(text) or "mathjax" in text.lower():
            offenders.append(str(page.relative_to(built_site)))
    assert not offenders, f"pages that load something from the internet: {offenders}"


# ------------------------------------------------------------------------ mystmd

MYSTMD_INSTALL = 'add "mystmd==1.11.0" to the docs extra in pyproject.toml, then: make setup'
MYSTMD_PROBLEM = re.compile(r"^\s*(⚠|⛔)")  # mystmd's warning and error lines
# What mystmd's `myst build --site` leaves out of a copy of the repository.
NOT_FOR_MYSTMD = shutil.ignore_patterns(".venv", ".git", "out", "_build", "__pycache__", ".pytest_cache")


def test_mystmd_reads_every_page_without_a_warning(tmp_path):
    """mystmd cannot build the site offline (it downloads its theme), but `myst build
    --site` reads and resolves every page of the toc (includes, cross-references,
    directive options) before it asks for the theme, and says what it could not do.
    Any such line fails the test: the same pages must read well in mystmd too."""
    myst = shutil.which("myst", path=f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}")
    if myst is None:
        pytest.skip(f"mystmd is not installed; {MYSTMD_INSTALL}")
    copy = tmp_path / "repo"  # mystmd writes _build/ beside myst.yml
    shutil.copytree(REPO, copy, ignore=NOT_FOR_MYSTMD, symlinks=True)
    result = subprocess.run([myst, "build", "--site"], cwd=copy, capture_output=True, text=True, timeout=120)
    log = result.stdout + result.stderr
    built = re.search(r"Built (\d+) pages for project", log)
    assert built, f"mystmd did not build the pages:\n{log}"
    assert int(built.group(1)) == len(TOC.files), f"mystmd built {built.group(1)} pages:\n{log}"
    problems = [line.strip() for line in log.splitlines() if MYSTMD_PROBLEM.match(line)]
    assert not problems, "mystmd's warnings and errors:\n" + "\n".join(problems)


# ------------------------------------------------------------------------ the browser


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (the base class's name)
        pass  # the test reports failures itself; a line per request would drown them


@pytest.fixture(scope="module")
def site_url(built_site):
    """The site served over HTTP on 127.0.0.1, on a free port, for the module."""
    handler = functools.partial(QuietHandler, directory=str(built_site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless chromium with a fresh profile, logging every network event and console
    message."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file() and shutil.which(Path(path).name) is None:
            pytest.skip(f"{path} is not installed; install it with: {INSTALL_BROWSER}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed; install it with: make setup")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    # Chromium's own new-tab page makes requests of its own (one to a host that cannot
    # be resolved here): leave it and forget them, so the logs hold only the site's.
    driver.get("about:blank")
    driver.get_log("performance")
    driver.get_log("browser")
    yield driver
    driver.quit()


@dataclass
class Visit:
    """What the browser saw on one page."""

    url: str
    title: str = ""
    headings: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    unhighlighted_blocks: list[str] = field(default_factory=list)
    token_spans: int = 0
    admonitions: int = 0
    cell_outputs: int = 0
    images: list[dict] = field(default_factory=list)


def network_events(driver) -> tuple[list[str], list[str]]:
    """The URLs requested since the last call, and those that failed (with why): a
    loading failure or an HTTP status of 400 or more."""
    requested: dict[str, str] = {}
    failed: list[str] = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            requested[params["requestId"]] = params["request"]["url"]
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            failed.append(f"{params['response']['url']}: HTTP {params['response']['status']}")
        elif method == "Network.loadingFailed":
            url = requested.get(params["requestId"], params["requestId"])
            failed.append(f"{url}: {params.get('errorText')}")
    return list(requested.values()), failed


def wait_for_quiet_network(driver, quiet_s: float = 0.3, limit_s: float = 5.0) -> tuple[list[str], list[str]]:
    """Network events until none came for quiet_s: scripts may fetch after the load event."""
    requested, failed = network_events(driver)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        more_requested, more_failed = network_events(driver)
        requested += more_requested
        failed += more_failed
        if not more_requested and not more_failed:
            break
    return requested, failed


# One script reads everything the checks need from a page, so each page costs one
# round trip to the browser.
READ_PAGE = """
const blocks = [...document.querySelectorAll('div[class*="highlight-"]:not(.output)')];
const unhighlighted = blocks.filter(block => {
    const language = [...block.classList].find(c => c.startsWith('highlight-')).slice(10);
    return !arguments[0].includes(language) &&
        block.querySelectorAll('div.highlight pre span[class]').length === 0;
}).map(block => block.className + ': ' + block.innerText.slice(0, 60));
return {
    title: document.title,
    headings: [...document.querySelectorAll('article h1')].map(h => h.innerText.trim()),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    unhighlighted: unhighlighted,
    token_spans: document.querySelectorAll('div.highlight pre span[class]').length,
    admonitions: document.querySelectorAll('div.admonition').length,
    cell_outputs: document.querySelectorAll('div.cell_output').length,
    images: [...document.querySelectorAll('div.cell_output img')].map(img => ({
        src: img.currentSrc, complete: img.complete, width: img.naturalWidth})),
};
"""


def visit(driver, url: str) -> Visit:
    driver.get(url)
    requested, failed = wait_for_quiet_network(driver)
    page = driver.execute_script(READ_PAGE, sorted(PLAIN_LANGUAGES))
    console = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    return Visit(
        url=driver.current_url, title=page["title"], headings=page["headings"],
        requested=requested, failed=failed, console_errors=console, links=page["links"],
        unhighlighted_blocks=page["unhighlighted"], token_spans=page["token_spans"],
        admonitions=page["admonitions"], cell_outputs=page["cell_outputs"], images=page["images"],
    )


@pytest.fixture(scope="module")
def visits(browser, site_url) -> dict[str, Visit]:
    """Every toc page, visited once in toc order, keyed by its toc file."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    seen = {}
    for file in TOC.files:
        seen[file] = visit(browser, site_url + page_path(file))
        if file in TOC.files[:2]:  # the home page and the first guide page
            browser.save_screenshot(str(SCREENSHOTS / (docname(file).replace("/", "-") + ".png")))
    return seen


def test_every_toc_page_loads_with_a_title(visits):
    untitled = [file for file, seen in visits.items()
                if not seen.headings or TOC.title not in seen.title or "<no title>" in seen.title]
    assert not untitled, f"pages without a heading or title: {untitled}"
    repeated = {file: seen.headings for file, seen in visits.items()
                if len(set(seen.headings)) < len(seen.headings)}
    assert not repeated, f"pages that show a heading twice: {repeated}"


def test_nothing_fails_to_load(visits):
    failures = {file: seen.failed for file, seen in visits.items() if seen.failed}
    assert not failures, f"requests that failed, by page: {failures}"


def test_no_request_leaves_127_0_0_1(visits):
    foreign = {
        file: [url for url in seen.requested if urlsplit(url).scheme in ("http", "https", "ws", "wss")
               and urlsplit(url).hostname != "127.0.0.1"]
        for file, seen in visits.items()
    }
    foreign = {file: urls for file, urls in foreign.items() if urls}
    assert not foreign, f"requests to other hosts, by page: {foreign}"


def test_no_script_errors(visits):
    errors = {file: seen.console_errors for file, seen in visits.items() if seen.console_errors}
    assert not errors, f"console errors, by page: {errors}"


class AnchorCollector(HTMLParser):
    """The ids and names a page's fragments can point to."""

    def __init__(self):
        super().__init__()
        self.anchors: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.anchors.add(value)


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, ""


def test_no_broken_internal_link(visits, site_url):
    """Every link to the site itself leads to a page that exists, and to an anchor on it."""
    targets: dict[str, set[str]] = {}  # page URL -> fragments linked to
    sources: dict[str, str] = {}
    for file, seen in visits.items():
        for link in seen.links:
            if not link.startswith(site_url):
                continue
            page, fragment = urldefrag(link)
            targets.setdefault(page, set())
            if fragment:
                targets[page].add(unquote(fragment))
            sources.setdefault(page, file)
    broken = []
    for page, fragments in sorted(targets.items()):
        status, text = fetch(page)
        if status != 200:
            broken.append(f"{page} (HTTP {status}, linked from {sources[page]})")
            continue
        if fragments and page.endswith((".html", "/")):
            collector = AnchorCollector()
            collector.feed(text)
            broken += [f"{page}#{fragment} (no such anchor)" for fragment in sorted(fragments - collector.anchors)]
    assert not broken, "broken internal links:\n" + "\n".join(broken)


def test_code_is_highlighted(visits):
    assert sum(seen.token_spans for seen in visits.values()) > 0, "no highlighted code on any page"
    plain = {file: seen.unhighlighted_blocks for file, seen in visits.items() if seen.unhighlighted_blocks}
    assert not plain, f"code blocks without Pygments token spans, by page: {plain}"


def test_admonitions_render(visits):
    with_admonitions = [file for file in TOC.files
                        if file.endswith(".md") and ADMONITION.search((REPO / file).read_text(encoding="utf-8"))]
    if not with_admonitions:
        pytest.skip("no page uses an admonition")
    unrendered = [file for file in with_admonitions if visits[file].admonitions == 0]
    assert not unrendered, f"pages whose admonitions did not render as div.admonition: {unrendered}"


def stored_output_types(notebook: Path) -> set[str]:
    """The MIME types of a notebook's stored outputs (plus 'stream')."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    kinds: set[str] = set()
    for cell in cells:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                kinds.add("stream")
            else:
                kinds.update(output.get("data", {}))
    return kinds


def test_notebooks_show_their_outputs_and_plots(visits):
    notebooks = [file for file in TOC.files if file.endswith(".ipynb")]
    with_plots = 0
    for file in notebooks:
        kinds = stored_output_types(REPO / file)
        seen = visits[file]
        if kinds:
            assert seen.cell_outputs > 0, f"{file} has stored outputs but its page shows none"
        if "image/png" in kinds:
            with_plots += 1
            assert seen.images, f"{file} has a stored plot but its page shows no image"
            unloaded = [image["src"] for image in seen.images if not image["complete"] or image["width"] == 0]
            assert not unloaded, f"{file}: images that did not load: {unloaded}"
    assert with_plots, "no notebook in the toc has a stored plot (image/png output) to check"


def test_next_from_the_home_page_opens_the_second_toc_page(browser, site_url, visits):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(site_url)  # the bare address redirects to the home page
    home = site_url + page_path(TOC.files[0])
    WebDriverWait(browser, 10).until(lambda driver: driver.current_url == home)
    next_link = browser.find_element(By.CSS_SELECTOR, "a.right-next")
    browser.execute_script("arguments[0].scrollIntoView()", next_link)
    next_link.click()
    second = site_url + page_path(TOC.files[1])
    WebDriverWait(browser, 10).until(lambda driver: driver.current_url.split("#")[0] == second)
    assert browser.title == visits[TOC.files[1]].title


def test_the_sidebar_lists_the_toc_in_order_with_its_captions(browser, site_url, visits):
    from selenium.webdriver.common.by import By

    browser.get(site_url + page_path(TOC.files[0]))
    sidebar = browser.find_element(By.CSS_SELECTOR, "nav.bd-links")
    listed = [link.get_attribute("href").split("#")[0]
              for link in sidebar.find_elements(By.CSS_SELECTOR, "a.reference.internal")]
    expected = [site_url + page_path(file) for file in TOC.files]
    assert [url for url in listed if url in expected] == expected, (
        f"the sidebar lists {listed}, the toc is {expected}")
    captions = [caption.get_attribute("textContent").strip()
                for caption in sidebar.find_elements(By.CSS_SELECTOR, "p.caption")]
    assert captions == [section.caption for section in TOC.sections if section.caption]
