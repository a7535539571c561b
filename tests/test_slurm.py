"""Every sbatch template, run on a real local Slurm cluster: to completion, preempted by a
higher-priority job, warned of its time limit, requeued from inside, chained, as an
array, and the trap pitfall that breaks everyone's first attempt.

Each job runs in a folder holding only the template files a user would copy, and every
interrupted job must end bitwise identical to the same training run without Slurm.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import checkpoint_utils as cu
from compare_checkpoints import checkpoint_differences
from copy_lists import copy_set
from conftest import TEMPLATES
from slurm_cluster import last_step, user_project

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

# What a user copies for the single-process template, extras included (copy-lists.toml).
KIT = tuple(copy_set("train_with_checkpoint"))
# Slow steps, so that signals land mid-run however fast the machine is.
SLOW = "--steps {steps} --simulate-step-seconds 0.02 --save-every-steps 50 --log-every 10"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, python_exe):
    """The final checkpoint of a training run without Slurm, per (steps, seed)."""
    cache = {}

    def final_checkpoint(steps: int, seed: int = 0):
        if (steps, seed) not in cache:
            folder = tmp_path_factory.mktemp(f"reference-{steps}-{seed}")
            subprocess.run([python_exe, str(TEMPLATES / "train_with_checkpoint.py"),
                            "--ckpt-dir", str(folder), "--steps", str(steps),
                            "--seed", str(seed), "--save-every-steps", "50"],
                           check=True, capture_output=True, timeout=120)
            cache[steps, seed] = folder / "last.pt"
        return cache[steps, seed]
    return final_checkpoint


def assert_same_run(reference_checkpoint, checkpoint, output_file):
    differences = checkpoint_differences(reference_checkpoint, checkpoint)
    assert differences == [], "\n".join(differences) + "\n" + output_file.read_text()[-3000:]


def wait_for_step(slurm, output_file, step: int, job_id: str, timeout: float = 90):
    slurm.wait_until(lambda: last_step(output_file) >= step, timeout,
                     f"job {job_id} to reach step {step}")


# ------------------------------------------------------------------ every file completes
@pytest.mark.parametrize("sbatch", ["basic_checkpoint.sbatch", "preemptible.sbatch",
                                    "preemptible_srun.sbatch", "auto_resume.sbatch"])
# array.sbatch and ddp.sbatch have their own completion tests below
def test_sbatch_file_runs_to_completion(sbatch, slurm, tmp_path):
    project = user_project(tmp_path, *KIT, sbatch)
    job_id = slurm.submit(project / sbatch, project, TRAIN_ARGS="--steps 60")
    job = slurm.wait_final(job_id)
    output = next(project.glob(f"*-{job_id}.out")).read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output
    assert "step 60/60" in output and "finished" in output
    if sbatch == "auto_resume.sbatch":  # the finished link cancels the successor it made
        successor = re.search(r"successor: job (\d+)", output)[1]
        assert slurm.wait_final(successor)["JobState"] == "CANCELLED"


def test_array_tasks_each_complete_with_their_own_seed(slurm, tmp_path, reference):
    project = user_project(tmp_path, *KIT, "array.sbatch")
    array_id = slurm.submit(project / "array.sbatch", project, "--array=0-1",
                            TRAIN_ARGS="--steps 60")
    for task in (0, 1):
        job = slurm.wait_final(f"{array_id}_{task}")
        assert job["JobState"] == "COMPLETED", job
    assert_same_run(reference(60, seed=1), project / "checkpoints/task_1/last.pt",
                    project / f"ckpt-array-{array_id}_1.out")


# ------------------------------------------------------------------ requeue from inside
@pytest.mark.parametrize("who_requeues", ["training", "batch shell"])
def test_signalled_job_saves_requeues_and_resumes(who_requeues, slurm, tmp_path, reference):
    """USR1 to the batch shell (what --signal=B:USR1@T does): training saves at the end of
    its step; then training runs scontrol requeue (exit 3), or, as inside a container
    without scontrol, exits 75 and the batch shell requeues."""
    project = user_project(tmp_path, *KIT, "preemptible.sbatch")
    args = SLOW.format(steps=300) + (" --no-requeue" if who_requeues == "batch shell" else "")
    job_id = slurm.submit(project / "preemptible.sbatch", project, TRAIN_ARGS=args)
    output_file = project / f"ckpt-preemptible-{job_id}.out"
    wait_for_step(slurm, output_file, 100, job_id)
    slurm.signal_batch(job_id, "USR1")

    job = slurm.wait_final(job_id, timeout=120)
    output = output_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output
    expected = ("saved and requeued the job" if who_requeues == "training"
                else "requeueing from the batch shell")
    assert expected in output
    assert "SLURM_RESTART_COUNT=1" in output and "resumed from preempt_" in output
    assert_same_run(reference(300), project / "checkpoints/last.pt", output_file)


def test_a_warning_before_training_listens_still_requeues(slurm, tmp_path):
    """A program that has no USR1 handler yet (still importing, on a busy node) dies of the
    warning: exit 138. Its newest checkpoint is intact, so the batch shell requeues the job
    as after exit 75; the next run goes on. The stand-in program starts slowly once."""
    project = user_project(tmp_path, "preemptible.sbatch")
    (project / "slow_start.py").write_text(
        "import os, sys, time\n"
        "if os.environ.get('SLURM_RESTART_COUNT', '0') == '0':\n"
        "    print('importing for a long time', flush=True)\n"
        "    time.sleep(120)\n")
    job_id = slurm.submit(project / "preemptible.sbatch", project, PROGRAM="slow_start.py")
    output_file = project / f"ckpt-preemptible-{job_id}.out"
    slurm.wait_until(lambda: output_file.exists() and "importing" in output_file.read_text(),
                     60, "the program to start")
    slurm.signal_batch(job_id, "USR1")

    job = slurm.wait_final(job_id, timeout=120)
    output = output_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output
    assert "killed training before it listened" in output, output


@pytest.mark.parametrize("sbatch", ["preemptible.sbatch", "preemptible_srun.sbatch"])
def test_scancel_ends_the_job_with_a_checkpoint_and_no_requeue(sbatch, slurm, tmp_path):
    """A user's scancel (SIGTERM to the job) must end it: the kit saves, and does not
    requeue, in the trap form and the srun form alike. The USR1 tests above still
    requeue: the warning signal is USR1, scancel's is TERM."""
    project = user_project(tmp_path, *KIT, sbatch)
    job_id = slurm.submit(project / sbatch, project, TRAIN_ARGS=SLOW.format(steps=3000))
    job_name = {"preemptible.sbatch": "ckpt-preemptible", "preemptible_srun.sbatch": "ckpt-srun"}
    output_file = project / f"{job_name[sbatch]}-{job_id}.out"
    wait_for_step(slurm, output_file, 100, job_id)
    slurm.run("scancel", job_id)

    job = slurm.wait_final(job_id, timeout=120)
    output = output_file.read_text()
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", output
    assert "not requeued (SIGTERM: scancel" in output, output
    saved = [info for info in cu.list_checkpoints(project / "checkpoints")
             if info.kind == "preempt"]
    assert saved, output
    cu.verify_checkpoint(saved[-1])
    assert saved[-1].step >= 100 and "requeued Slurm job" not in output


def test_srun_form_delivers_the_signal_to_the_step(slurm, tmp_path, reference):
    """--signal without B: reaches srun's tasks; no trap needed."""
    project = user_project(tmp_path, *KIT, "preemptible_srun.sbatch")
    job_id = slurm.submit(project / "preemptible_srun.sbatch", project,
                          TRAIN_ARGS=SLOW.format(steps=300))
    output_file = project / f"ckpt-srun-{job_id}.out"
    wait_for_step(slurm, output_file, 100, job_id)
    slurm.run("scancel", "--signal=USR1", job_id)  # no --batch: the job's steps

    job = slurm.wait_final(job_id, timeout=120)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output_file.read_text()
    assert_same_run(reference(300), project / "checkpoints/last.pt", output_file)


# ------------------------------------------------------------------ preemption and time limit
def test_three_preemptions_by_a_higher_priority_job(slurm, tmp_path, reference):
    """A job in the "high" partition needs the whole node: Slurm sends the low job its
    --signal, waits at most GraceTime, and requeues it. Three times in a row."""
    project = user_project(tmp_path, *KIT, "preemptible.sbatch")
    job_id = slurm.submit(project / "preemptible.sbatch", project,
                          TRAIN_ARGS=SLOW.format(steps=500))
    output_file = project / f"ckpt-preemptible-{job_id}.out"
    for preemption in range(3):
        wait_for_step(slurm, output_file, 80 + 120 * preemption, job_id, timeout=120)
        high = slurm.submit_command(project, "sleep 1", "--partition=high",
                                    "--cpus-per-task=8", "--output=/dev/null")
        slurm.wait_final(high, timeout=120)

    job = slurm.wait_final(job_id, timeout=180)
    output = output_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "3", output
    assert output.count("batch shell: got USR1") >= 3
    assert_same_run(reference(500), project / "checkpoints/last.pt", output_file)


@pytest.mark.timeout(420)  # a real time limit, its 30-s checks and a requeue: minutes
def test_time_limit_signal_arrives_before_the_kill(slurm, tmp_path, reference):
    """--time=1 --signal=B:USR1@50: Slurm warns the job 50 s before its one-minute limit
    (its time checks run every 30 s, so the warning comes 10-40 s in); the job saves,
    requeues itself and finishes in a later run instead of being killed."""
    project = user_project(tmp_path, *KIT, "preemptible.sbatch")
    args = "--steps 900 --simulate-step-seconds 0.05 --save-every-steps 100 --log-every 50"
    job_id = slurm.submit(project / "preemptible.sbatch", project, "--time=1",
                          "--signal=B:USR1@50", TRAIN_ARGS=args)
    expected = reference(900)  # computed while the job waits for its time limit
    job = slurm.wait_final(job_id, timeout=300)
    output_file = project / f"ckpt-preemptible-{job_id}.out"
    output = output_file.read_text()
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, output
    assert "DUE TO TIME LIMIT" not in output
    assert "received SIGUSR1" in output and "resumed from preempt_" in output
    assert_same_run(reference(900), project / "checkpoints/last.pt", output_file)


# ------------------------------------------------------------------ node failure
def processes_working_in(folder: Path) -> list[str]:
    """The command lines of the processes whose working folder is ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and os.readlink(proc / "cwd") == str(folder):
                found.append((proc / "cmdline").read_text().replace("\0", " "))
    return found


@pytest.mark.timeout(300)
def test_a_dead_node_requeues_the_job_and_it_resumes_on_the_other(slurm_two_nodes, tmp_path,
                                                                   reference):
    """Two nodes. The one running the job dies at once, as in a power loss: its slurmd and
    every process of the job are killed, nothing is signalled or saved. Slurm declares the
    node DOWN, requeues the job (--requeue), which starts on the other node, resumes from
    the newest periodic checkpoint and ends bitwise identical to an uninterrupted run."""
    cluster = slurm_two_nodes
    project = user_project(tmp_path, *KIT, "preemptible.sbatch")
    job_id = cluster.submit(project / "preemptible.sbatch", project,
                            TRAIN_ARGS=SLOW.format(steps=300))
    output_file = project / f"ckpt-preemptible-{job_id}.out"
    wait_for_step(cluster, output_file, 120, job_id)
    dead = cluster.job(job_id)["NodeList"]
    cluster.node_command("kill-node", dead)
    try:
        # Gone for real, as on a dead machine: no process of the job runs on in its folder
        # (Slurm needs ~10 s to notice the node, so the requeued run has not started yet).
        cluster.wait_until(lambda: not processes_working_in(project), 5,
                           "the job's processes to die with their node")
        job = cluster.wait_final(job_id, timeout=180)
    finally:
        cluster.node_command("revive-node", dead)  # for the next test on this cluster
    output = output_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output
    assert job["NodeList"] not in ("", dead), f"ran again on {job['NodeList']}:\n{output}"
    assert "resumed from step_" in output, output
    assert_same_run(reference(300), project / "checkpoints/last.pt", output_file)


# ------------------------------------------------------------------ DDP under srun
DDP_KIT = tuple(copy_set("train_ddp"))


def test_ddp_job_completes(slurm, tmp_path):
    project = user_project(tmp_path, *DDP_KIT, "ddp.sbatch")
    job_id = slurm.submit(project / "ddp.sbatch", project, TRAIN_ARGS="--steps 40")
    job = slurm.wait_final(job_id)
    output = (project / f"ckpt-ddp-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output
    assert "step 40/40" in output and "rendezvous 127.0.0.1:" in output


@pytest.mark.parametrize("cluster, placement", [
    ("slurm", ()),
    ("slurm_two_nodes", ("--nodes=2", "--ntasks-per-node=1")),
], ids=["one node", "a rank on each of two nodes"])
def test_ddp_job_is_signalled_on_every_rank_and_resumes(cluster, placement, request, tmp_path,
                                                        python_exe):
    """--signal=USR1 without B: reaches both srun tasks, on one node or on two; both stop
    after the same step, rank 0 requeues, and the resumed job ends like a 2-rank run that
    was never stopped."""
    from interrupted_run import run_until_finished
    slurm = request.getfixturevalue(cluster)

    args = SLOW.format(steps=200)
    reference_dir = tmp_path / "reference"
    command = [python_exe, str(TEMPLATES / "train_ddp.py"), "--ckpt-dir", str(reference_dir),
               *args.split()]
    run_until_finished(command, world_size=2, env={**os.environ, "OMP_NUM_THREADS": "1"})

    project = user_project(tmp_path, *DDP_KIT, "ddp.sbatch")
    job_id = slurm.submit(project / "ddp.sbatch", project, *placement, TRAIN_ARGS=args)
    output_file = project / f"ckpt-ddp-{job_id}.out"
    wait_for_step(slurm, output_file, 60, job_id)
    slurm.run("scancel", "--signal=USR1", job_id)
    job = slurm.wait_final(job_id, timeout=180)
    output = output_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output
    assert job["NumNodes"] == ("2" if placement else "1"), job
    assert_same_run(reference_dir / "last.pt", project / "checkpoints/last.pt", output_file)


def test_a_frozen_node_is_named_and_the_job_goes_on_without_it(slurm_two_nodes, tmp_path):
    """A rank on each of two nodes (ddp_multinode.sbatch); the second node freezes (every
    process on it stopped, its slurmd too, as a hung kernel or a dead network does). The
    rank on the first node waits in a collective; its watchdog names the frozen rank and
    its node within --peer-timeout and exits 6 instead of hanging until the time limit;
    Slurm finds the node dead and requeues the job, which ends on the first node. (When
    Slurm is slower to notice than the watchdog, the batch script requeues on exit 6: the
    next test.)"""
    cluster = slurm_two_nodes
    project = user_project(tmp_path, *DDP_KIT, "ddp.sbatch", "ddp_multinode.sbatch")
    args = SLOW.format(steps=400) + " --peer-timeout 4"
    job_id = cluster.submit(project / "ddp_multinode.sbatch", project, TRAIN_ARGS=args)
    output_file = project / f"ckpt-ddp-nodes-{job_id}.out"
    wait_for_step(cluster, output_file, 60, job_id)
    cluster.node_command("freeze-node", "n2")
    try:
        cluster.wait_until(lambda: "rank 1 on node n2 has made no progress"
                           in output_file.read_text(), 60, "the watchdog to name node n2")
        job = cluster.wait_final(job_id, timeout=180)
    finally:
        cluster.node_command("thaw-node", "n2")
        cluster.node_command("revive-node", "n2")  # for the next test on this cluster
    output = output_file.read_text()
    assert "task 0: Exited with exit code 6" in output, output  # rank 0 did not hang
    assert job["JobState"] == "COMPLETED" and job["NodeList"] == "n1", output
    assert job["Restarts"] == "1" and "step 400/400" in output, output


def test_a_lost_rank_ends_the_others_with_exit_6_and_the_job_requeues(slurm, tmp_path):
    """One rank of a ddp.sbatch job is killed, the node stays up: the other rank says that
    a rank is gone and exits 6; the run had saved, so the batch script requeues the job,
    and the next run finishes it."""
    project = user_project(tmp_path, *DDP_KIT, "ddp.sbatch")
    job_id = slurm.submit(project / "ddp.sbatch", project, TRAIN_ARGS=SLOW.format(steps=300))
    output_file = project / f"ckpt-ddp-{job_id}.out"
    wait_for_step(slurm, output_file, 60, job_id)
    rank_1 = next(pid for pid in os.listdir("/proc") if pid.isdigit() and
                  b"SLURM_PROCID=1\0" in read_or_empty(f"/proc/{pid}/environ") and
                  b"train_ddp.py" in read_or_empty(f"/proc/{pid}/cmdline"))
    os.kill(int(rank_1), signal.SIGKILL)
    job = slurm.wait_final(job_id, timeout=150)
    output = output_file.read_text()
    assert "rank 0: another rank is gone" in output, output
    assert "a rank was lost; this run saved progress: requeueing" in output, output
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), output


def read_or_empty(path: str) -> bytes:
    with contextlib.suppress(OSError):
        return Path(path).read_bytes()
    return b""


def test_a_dead_node_requeues_a_ddp_job_that_goes_on_with_fewer_ranks(slurm_two_nodes,
                                                                       tmp_path):
    """ddp_multinode.sbatch on both nodes (a rank on each). The first node dies at once,
    the batch shell with it. Slurm requeues the job, which starts again on the node that
    is left, with one rank: the run goes on where the epoch stood, and the samples log
    (sample_log_probe.py) shows each sample of every finished epoch used exactly once."""
    from test_elastic_resume import assert_each_sample_once, samples_per_epoch
    cluster = slurm_two_nodes
    project = user_project(tmp_path, *DDP_KIT, "ddp.sbatch", "ddp_multinode.sbatch")
    shutil.copy(Path(__file__).with_name("sample_log_probe.py"), project)
    samples = tmp_path / "samples"
    samples.mkdir()
    # 2048 samples in batches of 64: 16 steps per epoch on 2 ranks, 32 on 1.
    job_id = cluster.submit(project / "ddp_multinode.sbatch", project,
                            TRAIN_ARGS="--steps 60 --simulate-step-seconds 0.05 "
                                       "--save-every-steps 4 --log-every 1",
                            PROGRAM="sample_log_probe.py", SAMPLE_LOG=str(samples))
    output_file = project / f"ckpt-ddp-nodes-{job_id}.out"
    wait_for_step(cluster, output_file, 10, job_id)
    first = cluster.job(job_id)
    assert first["NodeList"] == "n[1-2]", f"started on {first['NodeList']}"
    cluster.node_command("kill-node", "n1")
    try:
        job = cluster.wait_final(job_id, timeout=180)
    finally:
        cluster.node_command("revive-node", "n1")  # for the next test on this cluster
    output = output_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["NodeList"] == "n2", output
    assert "saved by 2 ranks, now 1: the epoch goes on after its first" in output, output
    assert_each_sample_once(samples_per_epoch(samples), 2048, whole_epochs=2)


# ------------------------------------------------------------------ chain and array
def test_dependency_chain_continues_in_the_successor(slurm, tmp_path, reference):
    project = user_project(tmp_path, *KIT, "auto_resume.sbatch")
    first = slurm.submit(project / "auto_resume.sbatch", project, TRAIN_ARGS=SLOW.format(steps=300))
    first_output = project / f"ckpt-chain-{first}.out"
    wait_for_step(slurm, first_output, 100, first)
    slurm.signal_batch(first, "USR1")
    assert slurm.wait_final(first)["JobState"] in {"COMPLETED", "FAILED"}  # exits 75
    second = re.search(r"successor: job (\d+)", first_output.read_text())[1]

    assert slurm.wait_final(second, timeout=120)["JobState"] == "COMPLETED"
    second_output = (project / f"ckpt-chain-{second}.out").read_text()
    assert "link 2/" in second_output and "resumed from preempt_" in second_output
    third = re.search(r"successor: job (\d+)", second_output)[1]
    assert slurm.wait_final(third)["JobState"] == "CANCELLED"
    assert_same_run(reference(300), project / "checkpoints/last.pt", first_output)


def test_array_task_requeues_only_itself(slurm, tmp_path, reference):
    project = user_project(tmp_path, *KIT, "array.sbatch")
    array_id = slurm.submit(project / "array.sbatch", project, "--array=0-1",
                            TRAIN_ARGS=SLOW.format(steps=300))
    task1_output = project / f"ckpt-array-{array_id}_1.out"
    wait_for_step(slurm, task1_output, 100, f"{array_id}_1")
    slurm.signal_batch(f"{array_id}_1", "USR1")

    task0, task1 = (slurm.wait_final(f"{array_id}_{t}", timeout=150) for t in (0, 1))
    assert (task0["JobState"], task0["Restarts"]) == ("COMPLETED", "0")
    assert (task1["JobState"], task1["Restarts"]) == ("COMPLETED", "1"), task1_output.read_text()
    assert_same_run(reference(300, seed=1), project / "checkpoints/task_1/last.pt", task1_output)


# ------------------------------------------------------------------ the trap pitfall
FOREGROUND_JOB = """#!/bin/bash
#SBATCH --output=%x-%j.out
trap 'echo "batch shell: got USR1, forwarding"; kill -USR1 $(pgrep -f train_with_checkpoint)' USR1
python train_with_checkpoint.py --ckpt-dir checkpoints {args}   # foreground: the mistake
"""


@pytest.mark.parametrize("form", ["foreground child", "template"])
def test_trap_fires_only_while_the_shell_waits(form, slurm, tmp_path):
    """bash runs a trap only between commands: with training in the foreground, the
    USR1 waits until training ends, long after the warning window. The template runs
    training in the background and `wait`s, which a signal interrupts at once."""
    project = user_project(tmp_path, *KIT, "preemptible.sbatch")
    args = SLOW.format(steps=400)
    script = project / "preemptible.sbatch"
    if form == "foreground child":
        script = project / "foreground.sbatch"
        script.write_text(FOREGROUND_JOB.format(args=args))
    job_id = slurm.submit(script, project, "--job-name=trap", TRAIN_ARGS=args)
    output_file = project / f"trap-{job_id}.out"
    wait_for_step(slurm, output_file, 60, job_id)
    slurm.signal_batch(job_id, "USR1")
    saved = list((project / "checkpoints").glob("preempt_*.pt"))
    try:
        saved = slurm.wait_until(lambda: list((project / "checkpoints").glob("preempt_*.pt")),
                                 timeout=4, what="a preemption checkpoint")
    except TimeoutError:
        pass
    finally:
        slurm.run("scancel", job_id, check=False)
    if form == "template":
        assert saved, output_file.read_text()
    else:
        assert not saved and "got USR1" not in output_file.read_text()


# ------------------------------------------------------------------ preflight
@pytest.mark.parametrize("sbatch", ["preemptible.sbatch", "preemptible_srun.sbatch"])
def test_preflight_passes_in_the_templates(sbatch, slurm, tmp_path):
    project = user_project(tmp_path, *copy_set("preflight"), sbatch)
    job_id = slurm.submit(project / sbatch, project, "--job-name=preflight",
                          PROGRAM="preflight.py", TRAIN_ARGS="--state-mb 20")
    job = slurm.wait_final(job_id)
    output = (project / f"preflight-{job_id}.out").read_text()
    assert job["ExitCode"] == "0:0", output
    for check in ("--signal", "--requeue", "--open-mode=append", "save time", "signal delivery"):
        assert f"PASS  {check}:" in output, output
    assert "0 failed" in output


def test_preflight_catches_a_missing_signal(slurm, tmp_path):
    project = user_project(tmp_path, *copy_set("preflight"))
    script = project / "nosignal.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --output=%x-%j.out\n"
                      "trap 'kill -USR1 $(pgrep -f preflight.py)' USR1\n"
                      "python preflight.py --state-mb 1 --wait 3\n")
    job_id = slurm.submit(script, project, "--job-name=preflight")
    job = slurm.wait_final(job_id)
    output = (project / f"preflight-{job_id}.out").read_text()
    assert job["JobState"] == "FAILED", output
    assert "FAIL  --signal:" in output and "FAIL  signal delivery:" in output


PREFLIGHT = "python preflight.py --state-mb 1 --wait 3"
FORWARD = f"{PREFLIGHT} &\npid=$!\ntrap 'kill -{{sig}} $pid' {{sig}}\nwait $pid\nwait $pid\n"
SRUN_FORWARD = FORWARD.replace("python", "srun python")
# How public guides write the launch, as (signal line, body), each with the words the
# preflight must name, and the file with that advice applied, which must pass. {sig} is
# the warning signal: each form is run with USR1 and with USR2.
LAUNCH_FORMS = {
    "no B:, python in the foreground": (
        ("{sig}@60", f"{PREFLIGHT}\n"), ["--signal=B:{sig}@60", "srun python"],
        ("B:{sig}@60", f"exec {PREFLIGHT}\n")),
    "no B:, exec python": (
        ("{sig}@60", f"exec {PREFLIGHT}\n"), ["job steps only", "--signal=B:{sig}@60"],
        ("B:{sig}@60", f"exec {PREFLIGHT}\n")),
    "no B:, background with trap and wait": (
        ("{sig}@60", FORWARD), ["job steps only", "--signal=B:{sig}@60"],
        ("B:{sig}@60", FORWARD)),
    "B:, python in the foreground behind a trap": (
        ("B:{sig}@60", f"trap 'kill -{{sig}} $(pgrep -f preflight.py)' {{sig}}\n{PREFLIGHT}\n"),
        ["training runs in the foreground", "exec python"],
        ("B:{sig}@60", f"exec {PREFLIGHT}\n")),
    "B:, python in the foreground, no trap": (
        ("B:{sig}@60", f"{PREFLIGHT}\n"), ["no trap for {sig}", "exec python"],
        ("B:{sig}@60", FORWARD)),
    "B:, srun in the foreground": (
        ("B:{sig}@60", f"srun {PREFLIGHT}\n"), ["srun step", "--signal={sig}@60"],
        ("{sig}@60", f"srun {PREFLIGHT}\n")),
    "B:, srun in the background without a trap": (
        ("B:{sig}@60", f"srun {PREFLIGHT} &\nwait\n"), ["srun step", "trap 'kill -{sig}"],
        ("B:{sig}@60", SRUN_FORWARD)),
}


def preflight_job(slurm, project: Path, name: str, signal_line: str, body: str) -> str:
    script = project / f"{name}.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --output=%x-%j.out\n#SBATCH --signal={signal_line}"
                      f"\n#SBATCH --requeue\n#SBATCH --open-mode=append\n{body}")
    job_id = slurm.submit(script, project, f"--job-name={name}")
    slurm.wait_final(job_id)
    return (project / f"{name}-{job_id}.out").read_text()


@pytest.mark.parametrize("sig", ["USR1", "USR2"])
@pytest.mark.parametrize("form", LAUNCH_FORMS)
def test_preflight_names_the_fix_for_each_launch_form_and_the_fix_passes(form, sig, slurm,
                                                                        tmp_path):
    broken, advice, fixed = (
        [[part.format(sig=sig) for part in group] for group in LAUNCH_FORMS[form]])
    project = user_project(tmp_path, *copy_set("preflight"))
    output = preflight_job(slurm, project, "broken", *broken)
    # The live check fails too, or the job dies of the signal before it can say so.
    assert "FAIL  signal route:" in output and "PASS  signal delivery" not in output, output
    route = next(line for line in output.splitlines() if "signal route:" in line)
    for words in advice:
        assert words in route, f"{form}: the advice does not say {words!r}:\n{route}"
    output = preflight_job(slurm, project, "fixed", *fixed)
    assert "PASS  signal route:" in output and "PASS  signal delivery:" in output, output
    assert "0 failed" in output, output


def test_preflight_warns_that_a_sigterm_warning_stops_the_job_for_good(slurm, tmp_path):
    """SIGTERM is scancel's signal, after which the kit never requeues: as the time-limit
    warning it would end the job instead of continuing it. The preflight says so."""
    project = user_project(tmp_path, *copy_set("preflight"))
    output = preflight_job(slurm, project, "term", "B:TERM@60", f"exec {PREFLIGHT}\n")
    line = next(line for line in output.splitlines() if "  --signal:" in line)
    assert line.startswith("WARN") and "without a requeue" in line, output
    assert "Ask for USR1: '--signal=B:USR1@60'" in line, output


TORCHRUN = "torchrun --standalone --nproc_per_node=1 {flags}preflight.py --state-mb 1 --wait 3\n"
TORCHRUN_FLAG = "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2 "


@pytest.mark.parametrize("signal_line, launch, symptom", [
    ("USR2@60", "srun ", "User defined signal 2"),  # srun saw torchrun die of it
    ("B:USR2@60", "exec ", None),  # torchrun, the top process, died before its worker heard it
], ids=["srun torchrun", "B:, exec torchrun"])
def test_preflight_names_the_torchrun_fix_and_the_fix_passes(signal_line, launch, symptom,
                                                             slurm, tmp_path):
    """torchrun handles only SIGTERM unless told otherwise. Under srun with --signal=USR2
    (no B:), Slurm signals every process of the step: the worker hears USR2, but torchrun
    dies of it and ends the step while the worker saves. With B: and 'exec torchrun', only
    torchrun hears it and passes nothing on. The preflight names the flag in both; with
    it, torchrun survives, and passes the signal to its worker."""
    project = user_project(tmp_path, *copy_set("preflight"))
    output = preflight_job(slurm, project, "broken", signal_line,
                           launch + TORCHRUN.format(flags=""))
    route = next(line for line in output.splitlines() if "signal route:" in line)
    assert route.startswith("FAIL") and TORCHRUN_FLAG.strip() in route, output
    assert (symptom in output) if symptom else ("PASS  signal delivery" not in output), output
    output = preflight_job(slurm, project, "fixed", signal_line,
                           launch + TORCHRUN.format(flags=TORCHRUN_FLAG))
    assert "PASS  signal route:" in output and "PASS  signal delivery:" in output, output
    assert "0 failed" in output, output


def test_a_training_job_says_at_start_up_that_its_signal_cannot_arrive(slurm, tmp_path):
    """A public guide's shape (--signal without B:, python run in the batch script): the
    job's first lines say that the warning will never reach it, and what to change."""
    project = user_project(tmp_path, *KIT)
    script = project / "guide.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --output=%x-%j.out\n#SBATCH --signal=USR2@60\n"
                      "python train_with_checkpoint.py --steps 5 --ckpt-dir checkpoints\n")
    job_id = slurm.submit(script, project, "--job-name=guide")
    job = slurm.wait_final(job_id)
    output = (project / f"guide-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", output
    assert "the warning signal cannot reach this process: SIGUSR2 goes to job steps only" \
        in output, output
    assert "--signal=B:USR2@60" in output and "srun python" in output


# ------------------------------------------------------------------ exercise jobs
EXERCISE_JOBS = sorted(TEMPLATES.parent.glob("exercises/ex*/job.sbatch")
                       ) + sorted(TEMPLATES.parent.glob("*/exercises/ex*/job.sbatch"))


@pytest.mark.parametrize("job_file", EXERCISE_JOBS,
                         ids=lambda p: str(p.parent.relative_to(TEMPLATES.parent)))
def test_exercise_job_grades_on_the_cluster(job_file, slurm, tmp_path):
    """Each exercise's job.sbatch (Python, R, MATLAB) grades a copy of the exercise holding
    the reference solution, and so must report full marks. Task 1 only (GRADE_ARGS): the
    job file and its environment are what is tested here; tests/test_exercises.py grades
    every task."""
    from make_starters import function_file, load_exercise
    exercise = load_exercise(job_file.parent)
    folder = tmp_path / job_file.parent.name
    shutil.copytree(job_file.parent, folder)
    template = TEMPLATES.parent / exercise["template"]
    if template.is_dir():  # MATLAB: the reference's function files over the starters
        for task in exercise["tasks"]:
            for name in task["functions"]:
                shutil.copy(function_file(template, name, "matlab"), folder)
    else:
        shutil.copy(template, folder / exercise["starter"])
    job_id = slurm.submit(folder / "job.sbatch", folder, REPO=str(TEMPLATES.parent),
                          GRADE_ARGS="--task 1")
    job = slurm.wait_final(job_id, timeout=300)
    output = next(folder.glob(f"*-{job_id}.out")).read_text()
    assert job["JobState"] == "COMPLETED", output
    assert re.search(r"^score: (\d+)/\1$", output, re.M), output


# ------------------------------------------------------------------ the TensorFlow template
@pytest.mark.tensorflow
def test_tf_template_under_preemptible_sbatch_requeues_and_resumes(slurm, tmp_path,
                                                                    python_exe):
    """The TensorFlow template runs with the same batch script (PROGRAM=train_tf.py): a USR1
    to the batch shell makes it save, requeue, and end like a run that was never stopped."""
    pytest.importorskip("tensorflow")
    from compare_tf_checkpoints import tf_checkpoint_differences

    reference_dir = tmp_path / "reference"
    subprocess.run([python_exe, str(TEMPLATES / "train_tf.py"), "--ckpt-dir",
                    str(reference_dir), "--steps", "200", "--save-every-steps", "50"],
                   check=True, capture_output=True, timeout=120)
    project = user_project(tmp_path, *copy_set("train_tf"), "preemptible.sbatch")
    job_id = slurm.submit(project / "preemptible.sbatch", project, PROGRAM="train_tf.py",
                          TRAIN_ARGS=SLOW.format(steps=200))
    output_file = project / f"ckpt-preemptible-{job_id}.out"
    wait_for_step(slurm, output_file, 60, job_id)
    slurm.signal_batch(job_id, "USR1")
    job = slurm.wait_final(job_id, timeout=120)
    output = output_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output
    assert "saved and requeued the job" in output and "resumed from ckpt-" in output
    differences = tf_checkpoint_differences(reference_dir, project / "checkpoints")
    assert differences == [], "\n".join(differences) + "\n" + output[-3000:]


@pytest.mark.tensorflow
@pytest.mark.distributed
def test_tf_multiworker_under_srun_is_signalled_and_resumes(slurm, tmp_path, python_exe):
    """MultiWorkerMirroredStrategy with 2 srun tasks (ddp.sbatch, PROGRAM=...): the workers
    find each other through Slurm, both get USR1, stop after the same step, the chief
    requeues, and the resumed job ends like 2 workers that were never stopped."""
    pytest.importorskip("tensorflow")
    from compare_tf_checkpoints import tf_checkpoint_differences
    from interrupted_run import run_until_finished

    args = "--steps 120 --simulate-step-seconds 0.05 --save-every-steps 50 --log-every 10"
    reference_dir = tmp_path / "reference"
    run_until_finished([python_exe, str(TEMPLATES / "train_tf_multiworker.py"), "--ckpt-dir",
                        str(reference_dir), *args.split()], world_size=2,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    project = user_project(tmp_path, *copy_set("train_tf_multiworker"), "ddp.sbatch")
    job_id = slurm.submit(project / "ddp.sbatch", project, PROGRAM="train_tf_multiworker.py",
                          TRAIN_ARGS=args)
    output_file = project / f"ckpt-ddp-{job_id}.out"
    wait_for_step(slurm, output_file, 30, job_id)
    slurm.run("scancel", "--signal=USR1", job_id)
    job = slurm.wait_final(job_id, timeout=180)
    output = output_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output
    assert "requeued Slurm job" in output and "resumed from ckpt-" in output
    differences = tf_checkpoint_differences(reference_dir, project / "checkpoints")
    assert differences == [], "\n".join(differences) + "\n" + output[-3000:]
