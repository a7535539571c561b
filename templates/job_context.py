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


def signal_route_problem(script: str, environ: dict | None = None) -> str | None:
    """Why the warning signal that the batch ``script`` asks for cannot reach this process,
    with the fix that fits the script; None when it can, or when there is no --signal.

    Where Slurm sends it: without B: to the job steps (processes started by srun), with B:
    to the batch shell only. A batch shell passes nothing on by itself, and bash runs a
    trap only once a foreground child has ended."""
    found = signal_directive(script)
    if found is None:
        return None
    name, to_batch, lead = found
    env = os.environ if environ is None else environ
    in_step = "SLURM_STEP_ID" in env  # srun sets it; the batch script itself has none
    code = "\n".join(line.split("#")[0] for line in script.splitlines())  # no comments
    trap = re.search(rf"^\s*trap\s.*\b(SIG)?{name}\b", code, re.M)
    background = re.search(r"&\s*$", code, re.M) and re.search(r"\bwait\b", code)
    forward = f"\"trap 'kill -{name} $pid' {name}\" and 'wait $pid'"
    torchrun = "TORCHELASTIC_RUN_ID" in env  # a torchrun worker: torchrun must pass it on
    flag = f"--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIG{name}"
    launch = ("torchrun" + (f" {flag}" if name != "TERM" else "")) if torchrun else "python"
    if not to_batch and not in_step:
        return (f"SIG{name} goes to job steps only (--signal without B:), and this process "
                f"is not in one (it was not started by srun): it will never arrive. Fix: "
                f"'#SBATCH --signal=B:{name}@{lead}' and 'exec {launch} ...' (or '{launch} "
                f"... &' with {forward}), or start it with 'srun {launch} ...'")
    if to_batch and in_step and not (trap and background):
        return (f"SIG{name} goes to the batch shell only (B:), and this process runs in an "
                f"srun step that the shell does not signal. Fix: '#SBATCH --signal="
                f"{name}@{lead}' (no B:, so Slurm signals the step), or 'srun ... &', "
                f"'pid=$!' and {forward}")
    if to_batch and not in_step and not _started_by_exec(torchrun) and not (trap and background):
        return (f"SIG{name} goes to the batch shell, which does not pass it on to this "
                f"process ({'training runs in the foreground' if trap else f'no trap for {name}'}"
                f"). Fix: start it with 'exec {launch} ...', or with '{launch} ... &', 'pid=$!' "
                f"and {forward}")
    if (torchrun and name != "TERM"
            and not re.search(rf"--signals[-_]to[-_]handle[= ]\S*\bSIG{name}\b", code)):
        return (f"this process is a torchrun worker, and torchrun does not handle SIG{name} "
                f"(only SIGTERM): signalled itself, it dies of it, ending the step (srun) or the job "
                f"(exec) while this process saves, and passes nothing on. Fix: 'torchrun "
                f"{flag} ...', or 'srun python ...' with one task per rank (templates/ddp.sbatch)")
    return None


def _started_by_exec(torchrun: bool) -> bool:
    """True when this process took the batch shell's place (``exec python ...``), or the
    torchrun that started it did (``exec torchrun ...``): Slurm's step daemon is then the
    parent of this process, or of torchrun."""
    try:
        pid = os.getppid()
        if torchrun:  # the worker's parent is torchrun; look at torchrun's parent
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return Path(f"/proc/{pid}/comm").read_text().strip() == "slurmstepd"
    except (OSError, ValueError, IndexError):
        return False


# --------------------------------------------------------------------------- job context
def describe_signal_settings(job_id: str) -> tuple[str, str | None]:
    """The warning signal the job asked for, read from its batch script (Slurm has no
    command that shows it), or why it cannot be known; and why it cannot reach this
    process (``signal_route_problem``), or None."""
    try:
        script = slurm_command("scontrol", "write", "batch_script", job_id, "-")
    except SlurmCommandError as error:
        return f"unknown ({error})", None
    found = signal_directive(script)
    if found is None:
        return ("no #SBATCH --signal line in the batch script: no warning before the time "
                "limit (unless --signal was given on the sbatch command line)"), None
    name, to_batch, lead = found
    return (f"SIG{name} {lead} s before the time limit, to "
            f"{'the batch shell (B:)' if to_batch else 'every job step'}",
            signal_route_problem(script))


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
    context["signal"], context["signal_problem"] = describe_signal_settings(job_id)
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
    if context.get("signal_problem"):
        logger.warning("the warning signal cannot reach this process: %s",
                       context["signal_problem"])
    return context
