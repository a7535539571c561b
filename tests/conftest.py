"""Shared test set-up: the templates and the course scripts are importable by name, and
tests that need a system tool skip with the install command. Under CI=true a skipped test
fails the run (see pytest_sessionfinish): CI must run everything."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One thread per process for every test and everything it starts (training runs, ranks,
# graders, kernels, Slurm jobs). The models are tiny, and the suite runs several processes
# side by side on 2 cores: two OpenMP threads each, spinning while they wait for one
# another, made an 8-second training run take over 2 minutes under that load. Runs
# compared bitwise always run with the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"
SCRIPTS = REPO / "scripts"
for folder in (TEMPLATES, SCRIPTS):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def outside_slurm() -> dict:
    """This process's environment without SLURM_* variables: a run started by a test must
    not think it is a task of the Slurm job the suite itself may be running in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def require_command(command: str, install: str) -> str:
    """Return the path of ``command``, or skip the test saying how to install it."""
    path = shutil.which(command)
    if path is None:
        pytest.skip(f"{command} is not installed; install it with: {install}")
    return path


def free_ports(count: int = 2) -> int:
    """A port P such that P ... P+count-1 are free (slurmctld listens on P, each slurmd on
    one of the ports after it)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with contextlib.ExitStack() as held:
                for offset in range(1, count):
                    neighbour = held.enter_context(socket.socket())
                    neighbour.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {count} free neighbouring ports")


def local_cluster(tmp_path_factory, nodes: int):
    from slurm_cluster import SlurmCluster, start_cluster, stop_cluster

    directory = tmp_path_factory.mktemp(f"slurm-{nodes}-nodes")
    try:
        env = start_cluster(directory, free_ports(1 + nodes), nodes)
    except RuntimeError as error:
        pytest.skip(f"no local Slurm cluster: {error}")
    yield SlurmCluster(env)
    stop_cluster(env)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A fresh single-node Slurm cluster for the session, started by scripts/local-slurm
    (which installs Slurm and munge when missing and run as root)."""
    yield from local_cluster(tmp_path_factory, 1)


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory):
    """A fresh cluster of two nodes, n1 and n2, on this machine: a node can fail."""
    yield from local_cluster(tmp_path_factory, 2)


@pytest.fixture(scope="session")
def python_exe() -> str:
    """The interpreter running the tests (the project's .venv under `make test`)."""
    return sys.executable


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a skip is a failure, whatever raised it (a missing command, a module
    importorskip could not import, a mount not allowed): a green CI must mean that every
    test ran. On a laptop a skip stays a skip, with its reason in the summary (-ra)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") == "true" and skipped and exitstatus == pytest.ExitCode.OK:
        reporter.write_line(f"CI=true: {len(skipped)} skipped test(s) fail the run "
                            "(their reasons follow in the short test summary)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def signal_while_importing(command: list[str], library: str, sig: int, env: dict,
                           timeout: float = 180) -> tuple[int, str]:
    """Start ``command`` and send it ``sig`` while it is still importing its framework:
    ``library`` (a shared-object name) is mapped but no Python handler catches ``sig`` yet,
    the moment a Slurm warning may land on a busy node. Returns (exit code, output)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    status = Path(f"/proc/{process.pid}/status")
    try:
        deadline = time.monotonic() + 60
        while library not in Path(f"/proc/{process.pid}/maps").read_text():
            assert process.poll() is None and time.monotonic() < deadline, \
                f"{library} never loaded"
            time.sleep(0.005)
        caught = next(int(line.split()[1], 16) for line in status.read_text().splitlines()
                      if line.startswith("SigCgt:"))
        assert not caught >> (sig - 1) & 1, "the window was missed: a handler already listens"
        process.send_signal(sig)
        output, _ = process.communicate(timeout=timeout)
    finally:
        process.kill()
        process.wait()
    return process.returncode, output
