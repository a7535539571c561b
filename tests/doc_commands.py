"""The shell commands the pages show, and a shell to run them in as a reader would.

Every command in a ```bash block of the pages below is run by a test exactly as shown,
or the block says why not with a comment line::

    # not run by the tests: needs MATLAB, which is not installed here

that covers the commands after it in the block. A test names each command it runs with
``shown(page, command)``, which fails when the page no longer shows that command, and
``test_doc_commands.py`` fails when a page shows a command that no test names that way.
Commands are compared without their trailing comment and with continuation lines joined.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOT_RUN = "# not run by the tests:"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(`{3,}|~{3,})\s*(\{[\w-]+\})?\s*([\w-]*)")


def pages() -> list[Path]:
    """The pages whose commands a reader copies: the top README, the guides, and the
    READMEs of the folders a reader opens."""
    found = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for folder in ("templates", "exercises", "r", "matlab", "examples", "scripts", "notebooks"):
        found += sorted((REPO / folder).glob("**/README.md"))
    return found


@dataclasses.dataclass(frozen=True)
class ShownCommand:
    page: str            # relative to the repository, e.g. "docs/r.md"
    line: int            # of the command's first line in the page
    text: str            # as run: no trailing comment, continuation lines joined
    not_run_because: str | None


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a # inside quotes or a word stays)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands_of_block(page: str, first_line: int, lines: list[str]) -> list[ShownCommand]:
    found, reason, pending, start = [], None, "", 0
    for number, line in enumerate(lines, first_line):
        stripped = line.strip()
        if not pending and stripped.startswith("#"):
            if stripped.startswith(NOT_RUN):
                reason = stripped[len(NOT_RUN):].strip() or "(no reason given)"
            continue
        if not stripped:
            continue
        if stripped.startswith("$ "):  # a console block's prompt
            stripped = stripped[2:]
        start = start if pending else number
        code = strip_comment(stripped)
        if code.endswith("\\"):
            pending += code[:-1].strip() + " "
            continue
        text = " ".join((pending + code).split())
        found.append(ShownCommand(page, start, text, reason))
        pending = ""
    return found


def shown_commands(page: Path) -> list[ShownCommand]:
    """Every command of the shell blocks of ``page``."""
    lines, found, i = page.read_text().splitlines(), [], 0
    name = page.relative_to(REPO).as_posix()
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, directive, language = match.groups()
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].startswith(fence[0] * len(fence))), len(lines))
        if (directive in (None, "{code-block}", "{code}")) and language in SHELL_LANGUAGES:
            found += commands_of_block(name, i + 2, lines[i + 1:end])
        i = end + 1
    return found


def all_shown_commands() -> list[ShownCommand]:
    return [command for page in pages() for command in shown_commands(page)]


def shown(pages_: str | tuple[str, ...], command: str) -> str:
    """``command`` as the page (or each of several pages) shows it; fails when a page no
    longer shows it, so a test that runs it never runs a command no reader sees.
    Placeholders (``<jobid>``) stay: the test puts its values in."""
    for page in (pages_,) if isinstance(pages_, str) else pages_:
        texts = {c.text for c in shown_commands(REPO / page)}
        assert command in texts, f"{page} no longer shows `{command}`"
    return command


def copy_of_repository(target: Path) -> Path:
    """The repository's files (tracked, and new ones git does not ignore) in ``target``,
    with the virtual environment linked: commands that write where a reader's would
    (checkpoints in templates/, out/) write there, not in the repository."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(REPO / ".venv")
    return target


def reader_environment(home: Path) -> dict:
    """A reader's shell after `make setup`: no Slurm job around it, no variables of the
    make, pytest or virtual environment running this test (the shell activates it as
    docs/setup.md says)."""
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTHONPATH", "VIRTUAL_ENV")}
    venv_bin = str(REPO / ".venv" / "bin")
    path = [folder for folder in env["PATH"].split(os.pathsep) if folder != venv_bin]
    return {**env, "HOME": str(home), "PATH": os.pathsep.join(path)}


class Shell:
    """One bash process that runs commands one after the other, the way a reader types
    them into a terminal: ``cd``, ``export``, ``eval`` and background jobs carry over.

    Example::

        shell = Shell(folder, env)
        output = shell.run("cd templates && python train.py --steps 10")
        shell.start("python train.py --steps 600")        # in the foreground, still running
        shell.wait_for(r"step 50/")
        os.kill(shell.foreground_pid(), signal.SIGUSR1)   # "from another shell"
        code, output = shell.finish()
    """

    def __init__(self, folder: Path, env: dict):
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=folder, env=env, text=True, bufsize=1,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self._marker = 0

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def start(self, command: str) -> None:
        """Type ``command``; do not wait for it."""
        self._marker += 1
        self._end = f"__command {self._marker} ended with"
        self.output = []
        self.process.stdin.write(f"{command}\necho \"{self._end} $?\"\n")
        self.process.stdin.flush()

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        """Read the running command's output until a line matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(deadline, f"a line matching {pattern!r}")
            if line.startswith(self._end):
                raise AssertionError(f"the command ended before printing {pattern!r}:\n"
                                     + "\n".join(self.output[-30:]))
            self.output.append(line)
            if match := re.search(pattern, line):
                return match

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """Wait for the running command to end: its exit code and its whole output."""
        deadline = time.monotonic() + timeout
        while not (line := self._next_line(deadline, "the end")).startswith(self._end):
            self.output.append(line)
        return int(line.split()[-1]), "\n".join(self.output)

    def run(self, command: str, timeout: float = 300, code: int | None = 0) -> str:
        """Run ``command`` to its end; assert its exit code (unless None); its output."""
        self.start(command)
        exit_code, output = self.finish(timeout)
        assert code is None or exit_code == code, (
            f"`{command}` exited {exit_code}, not {code}:\n{output[-3000:]}")
        return output

    def foreground_pid(self) -> int:
        """The newest process this shell started: the command in the foreground."""
        children = subprocess.run(["pgrep", "-n", "-P", str(self.process.pid)],
                                  capture_output=True, text=True).stdout.split()
        assert children, "the shell runs no command"
        return int(children[0])

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def _next_line(self, deadline: float, what: str) -> str:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"waited in vain for {what}:\n"
                                 + "\n".join(self.output[-30:])) from None
        if line is None:
            raise AssertionError("the shell ended:\n" + "\n".join(self.output[-30:]))
        return line
