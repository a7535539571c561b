"""Where this run of the job runs: one log block at start-up with the Slurm job id, array
task, restart count, nodes, time limit and time left, the warning signal, the host and the
checkpoint folder, so that the log of a requeued job tells its runs apart. Standard library
only: the PyTorch, TensorFlow and any other training script can import it.

    from job_context import log_job_context
    log_job_context(args.ckpt_dir)      # after logging.basicConfig, before anything slow

Slurm commands run with an argument list, never through a shell; a missing scontrol or
squeue (inside a container, say) is said in the block, never raised.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger("job")


# --------------------------------------------------------------------------- Slurm commands
class SlurmCommandError(Exception):
    """A Slurm command could not answer: not on PATH, timed out, or refused."""


def slurm_command(command: str, *args: str, timeout: float = 15.0) -> str:
    """The output of a Slurm command (scontrol, squeue, scancel), run with an argument
    list, never through a shell. Raises ``SlurmCommandError`` saying why not: inside a
    container the commands are often missing, and a busy controller can be slow."""
    executable = shutil.which(command)
    if executable is None:
        raise SlurmCommandError(f"{command} is not on PATH (inside a container?)")
    try:
        result = subprocess.run([executable, *args], capture_output=True, text=True,
                                timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmCommandError(f"{command} did not answer within {timeout:g} s") from None
    except OSError as error:
        raise SlurmCommandError(f"{command} could not run: {error}") from None
    if result.returncode != 0:
        raise SlurmCommandError(f"{command} {' '.join(args)} failed: "
                                f"{(result.stderr or result.stdout).strip()}")
    return result.stdout


def scontrol(*args: str) -> str | None:
    """The output of ``scontrol ARGS``, or None when scontrol is missing or fails."""
    try:
        return slurm_command("scontrol", *args)
    except SlurmCommandError:
        return None


def signal_directive(script: str) -> tuple[str, bool, int] | None:
    """(signal name, to batch shell only, lead seconds) from an #SBATCH --signal line."""
    match = re.search(r"^#SBATCH\s+--signal[= ](B:)?(?:SIG)?(\w+)(?:@(\d+))?", script, re.M)
    if not match:
        return None
    return match[2], bool(match[1]), int(match[3] or 60)  # Slurm's default lead is 60 s


# --------------------------------------------------------------------------- job context
def describe_signal_settings(job_id: str) -> str:
    """The warning signal the job asked for, read from its batch script (Slurm has no
    command that shows it), or why it cannot be known."""
    try:
        script = slurm_command("scontrol", "write", "batch_script", job_id, "-")
    except SlurmCommandError as error:
        return f"unknown ({error})"
    found = signal_directive(script)
    if found is None:
        return ("no #SBATCH --signal line in the batch script: no warning before the time "
                "limit (unless --signal was given on the sbatch command line)")
    name, to_batch, lead = found
    return (f"SIG{name} {lead} s before the time limit, to "
            f"{'the batch shell (B:)' if to_batch else 'every job step'}")


def read_job_context(ckpt_dir: str | os.PathLike, environ: dict | None = None) -> dict:
    """Where this process runs: Slurm job id, array job/task, restart count, nodes, tasks,
    time limit and time left, the warning signal, host and checkpoint folder. Values that
    cannot be read say why. ``job_id`` is None outside Slurm."""
    env = os.environ if environ is None else environ
    context = {"job_id": env.get("SLURM_JOB_ID"), "host": platform.node(),
               "checkpoint_folder": str(Path(ckpt_dir).absolute())}
    job_id = context["job_id"]
    if job_id is None:
        return context
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    context.update(
        array=f"job {array_job}, task {array_task}" if array_job else "not an array job",
        # Slurm sets SLURM_RESTART_COUNT only from the first requeue on.
        restart_count=env.get("SLURM_RESTART_COUNT", "0"),
        node_list=env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "unknown",
        tasks=env.get("SLURM_NTASKS") or "not set (one task)",
    )
    if not re.fullmatch(r"[0-9]+", job_id):  # never hand a strange id to a command
        context["time_limit"] = context["signal"] = f"unknown (odd SLURM_JOB_ID {job_id!r})"
        return context
    try:
        limit, left = slurm_command("squeue", "-h", "-j", job_id, "-o", "%l|%L").strip().split("|")
        context["time_limit"] = f"{limit}, {left} left"
    except (SlurmCommandError, ValueError) as error:
        context["time_limit"] = f"unknown ({error or 'squeue did not list the job'})"
    context["signal"] = describe_signal_settings(job_id)
    return context


JOB_CONTEXT_LABELS = {"job_id": "Slurm job id", "array": "array", "restart_count":
                      "restart count", "node_list": "node list", "tasks": "tasks",
                      "time_limit": "time limit", "signal": "warning signal",
                      "host": "host", "checkpoint_folder": "checkpoint folder"}


def log_job_context(ckpt_dir: str | os.PathLike, environ: dict | None = None,
                    logger: logging.Logger = log) -> dict:
    """Log, once at start-up, one block that says where and how this run of the job runs;
    outside Slurm one line that says so. Returns what it logged (see ``read_job_context``).
    When a requeued job misbehaves, this block is the first thing to read in its output.

    Example::

        log_job_context(args.ckpt_dir)
    """
    context = read_job_context(ckpt_dir, environ)
    if context["job_id"] is None:
        logger.info("not inside a Slurm job (no SLURM_JOB_ID): host %s, checkpoint folder %s",
                    context["host"], context["checkpoint_folder"])
        return context
    lines = [f"{label + ':':<19}{context[key]}" for key, label in JOB_CONTEXT_LABELS.items()]
    logger.info("job context\n    %s", "\n    ".join(lines))
    return context
