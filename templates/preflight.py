"""Preflight: run once inside your Slurm job, in place of training, before you trust the
job with a week of compute. Needs checkpoint_utils.py, storage_check.py and job_context.py
beside it.

    sbatch --export=ALL,PROGRAM=preflight.py preemptible.sbatch
    # or in your own sbatch file: python preflight.py --ckpt-dir checkpoints --state-mb 2000

It checks, for real, inside the job:
  1. the job context (job id, restarts, node, time limit);
  2. the sbatch file asks for a warning signal (--signal), a requeue (--requeue) and keeps
     the output of earlier runs (--open-mode=append);
  3. scontrol is reachable (training needs it to requeue itself);
  4. the checkpoint folder is writable and has room for --keep checkpoints;
  5. a save of --state-mb MB finishes well within the signal's lead time;
  6. the signal reaches this process: it asks Slurm to send it now, the way Slurm will at
     the time limit, and waits for it (a foreground child behind a trap, or torchrun with
     SIGUSR1, fails here).
Exit code 0 when nothing failed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from checkpoint_utils import CheckpointManager, PreemptionHandler
from job_context import read_job_context, scontrol, signal_directive
from storage_check import StorageUnusableError, check_checkpoint_storage, human_bytes


# --------------------------------------------------------------------------- the preflight CLI
results: list[tuple[str, str, str]] = []  # (PASS/WARN/FAIL, check, detail)


def report(status: str, check: str, detail: str) -> None:
    results.append((status, check, detail))
    print(f"{status:4}  {check}: {detail}", flush=True)


def check_job(job_id: str) -> tuple[str, dict]:
    """The job's batch script and its context (see job_context.read_job_context)."""
    context = read_job_context(".")
    report("PASS", "job", f"{job_id} on {context['host']}, restart "
           f"{context['restart_count']}, time limit {context['time_limit']}")
    return scontrol("write", "batch_script", job_id, "-") or "", context


def check_directives(script: str, job_id: str, problem: str | None):
    found = signal_directive(script)
    if found is None:
        report("FAIL", "--signal", "no '#SBATCH --signal=B:USR1@<seconds>' (or without B: "
               "under srun): the job gets no warning before its time limit")
    else:
        name, batch, lead = found
        where = 'the batch shell (B:)' if batch else 'job steps (srun) only'
        if name == "TERM":  # scancel's signal: the kit saves and stops, never requeues
            report("WARN", "--signal", f"SIGTERM {lead} s before the limit, to {where}: the kit "
                   "saves and stops on SIGTERM without a requeue (it is what scancel sends), "
                   f"so this job will not go on. Ask for USR1: '--signal={'B:' if batch else ''}"
                   f"USR1@{lead}'")
        else:
            report("PASS", "--signal", f"SIG{name} {lead} s before the limit, to {where}")
        report("FAIL" if problem else "PASS", "signal route",
               problem or "this process is where that signal goes, or it is passed on")
    # What the job really has: the cluster's JobRequeue default applies without the flag.
    requeue = re.search(r"\bRequeue=(\d)", scontrol("show", "job", "-o", job_id) or "")
    in_script = re.search(r"^#SBATCH\s+--requeue", script, re.M)
    if requeue and requeue[1] == "1":
        report("PASS", "--requeue", "set" if in_script else
               "not in the script, but the job can be requeued (Requeue=1: the cluster's "
               "JobRequeue default); add '#SBATCH --requeue' so that it does not depend on it")
    else:
        report("WARN", "--requeue", "the job cannot be requeued (Requeue=0): add "
               "'#SBATCH --requeue'")
    if re.search(r"^#SBATCH\s+--open-mode=append", script, re.M):
        report("PASS", "--open-mode=append", "set")
    else:
        report("WARN", "--open-mode=append", "not set: each requeued run truncates the "
               "output file")
    return found


def check_storage_and_save_time(ckpt_dir: Path, state_mb: float, keep: int, lead: int) -> None:
    try:
        numbers = check_checkpoint_storage(ckpt_dir, int(state_mb * 1e6), keep=keep)
    except StorageUnusableError as error:
        report("FAIL", "storage", str(error))
        return
    report("PASS", "storage", f"{human_bytes(numbers['free_bytes'])} free in {ckpt_dir}, "
           f"{human_bytes(numbers['needed_bytes'])} needed for {keep}+1 checkpoints of "
           f"{state_mb:g} MB; a probe file was written, renamed and deleted")
    with tempfile.TemporaryDirectory(dir=ckpt_dir, prefix=".preflight-") as scratch:
        state = {"model": {"weights": torch.ones(int(state_mb * 1e6 / 4))}}
        started = time.perf_counter()
        CheckpointManager(scratch).save(state, step=1, epoch=0)
        seconds = time.perf_counter() - started
    status = "PASS" if seconds * 3 < lead else ("WARN" if seconds < lead else "FAIL")
    report(status, "save time", f"{seconds:.2f} s for {state_mb:g} MB; lead time {lead} s "
           "(keep the save under a third of it)")


def check_signal_arrives(job_id: str, name: str, to_batch: bool, wait: float,
                         problem: str | None) -> None:
    with PreemptionHandler() as handler:
        command = ["scancel", f"--signal={name}", job_id] + (["--batch"] if to_batch else [])
        subprocess.run(command, capture_output=True, timeout=30)
        deadline = time.monotonic() + wait
        while not handler.requested and time.monotonic() < deadline:
            time.sleep(0.05)
        if handler.requested:
            # Under srun, a launcher that passes signals on (torchrun --signals-to-handle)
            # sends a second copy after Slurm's: it must not end the preflight.
            handler.ignore_further_signals()
    if handler.requested and handler.signal_name == f"SIG{name}":
        report("PASS", "signal delivery", f"{handler.signal_name} reached this process")
    elif handler.requested:
        report("FAIL", "signal delivery", f"{handler.signal_name} came instead of SIG{name}: "
               f"the batch shell died of SIG{name} and Slurm ended the job. "
               + (problem or "Pass the signal on from the batch shell with a trap"))
    else:
        report("FAIL", "signal delivery", f"SIG{name} sent with {' '.join(command)} did not "
               f"arrive within {wait:g} s. " + (problem or "Between the batch shell or srun "
               "and this process something does not pass it on: a launcher (torchrun passes "
               "on SIGTERM, not SIGUSR1/SIGUSR2), a container runtime, or a wrapper script"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", default="checkpoints")
    p.add_argument("--state-mb", type=float, default=100.0, help="size of your checkpoint")
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the signal")
    args, _ = p.parse_known_args(argv)  # accept the training flags of the sbatch file too

    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        report("FAIL", "job", "not inside a Slurm job: run this from your sbatch file")
        return 1
    if shutil.which("scontrol") is None or shutil.which("scancel") is None:
        report("FAIL", "scontrol", "scontrol/scancel not on PATH (inside a container?): "
               "training cannot requeue itself; let the batch script requeue on exit 75")
        return 1
    report("PASS", "scontrol", shutil.which("scontrol"))
    script, context = check_job(job_id)
    found = check_directives(script, job_id, context.get("signal_problem"))
    name, to_batch, lead = found or ("USR1", True, 60)
    check_storage_and_save_time(Path(args.ckpt_dir), args.state_mb, args.keep, lead)
    check_signal_arrives(job_id, name, to_batch, args.wait, context.get("signal_problem"))
    failed = [check for status, check, _ in results if status == "FAIL"]
    print(f"preflight: {len(results)} checks, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
