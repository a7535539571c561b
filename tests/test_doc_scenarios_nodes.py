"""The two-node walk-throughs of docs/slurm.md and docs/multi-node.md, run as a reader
runs them (see test_doc_scenarios.py): a node killed under a running job, the job
requeued and resumed on the other node. A job that would go on for minutes is cancelled
once it has shown what the page promises."""
from __future__ import annotations

import re

import pytest

from doc_commands import shown
from slurm_cluster import SlurmCluster
from test_doc_scenarios_slurm import SUBMITTED, job_output, slurm_terminal, wait_for_text

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.docs]
SLURM_PAGE = "docs/slurm.md"
MULTI_NODE = "docs/multi-node.md"
BOTH = ("docs/slurm.md", "docs/multi-node.md")
TWO_NODES_SHOWN = [(BOTH, 'scripts/local-slurm up --nodes 2 && eval "$(scripts/local-slurm env)"')]


@pytest.fixture(scope="module")
def terminal(tmp_path_factory):
    """The two-node cluster both pages start."""
    yield from slurm_terminal(tmp_path_factory.mktemp("doc-nodes"), *TWO_NODES_SHOWN)


def wait_until_running(cluster: SlurmCluster, job: str, restarts: int = 0) -> dict:
    return cluster.wait_until(
        lambda: (lambda j: j if j.get("JobState") == "RUNNING"
                 and int(j.get("Restarts", 0)) == restarts else None)(cluster.job(job)),
        120, f"job {job} to run (restart {restarts})")


def wait_for_idle_nodes(cluster: SlurmCluster) -> None:
    cluster.wait_until(lambda: set(cluster.run("sinfo", "-h", "-o", "%t").split()) == {"idle"},
                       60, "both nodes idle")


def test_the_slurm_page_kills_the_node_under_a_job(terminal):
    shell, copy, cluster = terminal
    submitted = shell.run(shown(("docs/slurm.md", "README.md", "docs/setup.md"),
                                "cd templates && PATH=$PWD/../.venv/bin:$PATH "
                                "sbatch preemptible.sbatch"))
    job = SUBMITTED.search(submitted)[1]
    wait_for_text(cluster, job, r"saved step_\d+\.pt")  # a periodic save to resume from
    node = cluster.job(job)["NodeList"]
    assert node in shell.run(shown(BOTH, "squeue"))
    shell.run(shown(SLURM_PAGE, "../scripts/local-slurm kill-node <node>").replace("<node>", node))
    state = wait_until_running(cluster, job, restarts=1)
    assert state["NodeList"] != node, state
    nodes = shell.run(shown(BOTH, "squeue; sinfo"))
    assert re.search(rf"down\*?\s+{node}\b", nodes), nodes
    wait_for_text(cluster, job, r"resumed from step_")
    shell.run(shown(SLURM_PAGE, "../scripts/local-slurm revive-node <node>").replace("<node>", node))
    shell.run(f"scancel {job}; cd ..")  # the page's run would go on to step 20000
    wait_for_idle_nodes(cluster)


def test_the_multi_node_page_goes_on_with_the_node_left(terminal):
    shell, copy, cluster = terminal
    shell.run(shown(MULTI_NODE, "mkdir -p out/multi-node && cp templates/ddp.sbatch "
                          "templates/ddp_multinode.sbatch templates/{train_ddp,checkpoint_utils,"
                          "distributed_utils,train_with_checkpoint,storage_check,job_context,"
                          "checkpoint_staging}.py out/multi-node/"))
    shell.run(shown(MULTI_NODE, "cd out/multi-node && export PATH=$PWD/../../.venv/bin:$PATH"))
    submitted = shell.run(shown(MULTI_NODE, 'TRAIN_ARGS="--steps 2000 --simulate-step-seconds 0.05 '
                                      '--save-every-steps 50 --peer-timeout 10" '
                                      "sbatch ddp_multinode.sbatch"))
    job = SUBMITTED.search(submitted)[1]
    wait_for_text(cluster, job, r"saved step_\d+\.pt")
    assert "n[1-2]" in shell.run(shown(BOTH, "squeue"))
    shell.run(shown(MULTI_NODE, "../../scripts/local-slurm kill-node n1"))
    wait_for_text(cluster, job, r"saved by 2 ranks, now 1: the epoch goes on after")
    assert cluster.job(job)["NodeList"] == "n2"
    shell.run(shown(BOTH, "squeue; sinfo"))
    shell.run(shown(MULTI_NODE, "../../scripts/local-slurm revive-node n1"))
    shell.run(f"scancel {job}")
    assert "Traceback" not in job_output(cluster, job).read_text()
