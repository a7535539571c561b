"""How often should a job checkpoint? The Young/Daly interval from the cost of one save
and the mean time between interruptions, with the time each choice is expected to lose.

    python scripts/checkpoint_interval.py --save-seconds 20 --mtbi 6h
    python scripts/checkpoint_interval.py --measure-bytes 2GB --dir /scratch/me/ckpt --mtbi 1d
    python scripts/checkpoint_interval.py --measure checkpoints/last.pt --mtbi 12h --signal-lead 120

The interruptions that count are those that come WITHOUT warning (a node failure, an
out-of-memory kill, a preemption with no signal): a time limit or a preemption announced
by ``--signal`` costs only the emergency save, as long as the save fits in the warning
time. That warning time is checked too.

The model: a save costs C seconds of training; interruptions arrive at random with mean
time M between them; each loses, on average, half an interval of work plus the restart
R. Checkpointing every T seconds then wastes about C/T + (T/2 + R)/M of the run. Young's
optimum is T = sqrt(2*C*M); Daly's refinement, used here, adds the higher-order terms
and stays right when C is not small against M.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from pathlib import Path

UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '6h', '1.5d' -> seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(s|m|min|h|d)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90s, 15m, 6h, 2d)")
    return float(match[1]) * UNITS[match[2] or "s"]


def parse_bytes(text: str) -> int:
    """'500MB', '2GiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.e+]+)\s*([a-z]*)\s*", text.lower())
    if not match or match[2] not in BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 500MB, 2GiB)")
    return int(float(match[1]) * BYTE_UNITS[match[2]])


def young_interval(save_seconds: float, mtbi: float) -> float:
    """Young (1974): the first-order optimum sqrt(2*C*M)."""
    return math.sqrt(2 * save_seconds * mtbi)


def daly_interval(save_seconds: float, mtbi: float) -> float:
    """Daly (2006): the higher-order optimum of the time between the ENDS of two saves,
    minus the save itself; when a save costs more than 2*M, checkpoint once per M."""
    c, m = save_seconds, mtbi
    if c >= 2 * m:
        return m
    ratio = math.sqrt(c / (2 * m))
    return math.sqrt(2 * c * m) * (1 + ratio / 3 + ratio ** 2 / 9) - c


def wasted_fraction(interval: float, save_seconds: float, mtbi: float,
                    restart_seconds: float = 0.0) -> float:
    """The expected share of the run spent saving or redoing lost work (first order)."""
    return save_seconds / interval + (interval / 2 + restart_seconds) / mtbi


def measure_save_seconds(nbytes: int | None, checkpoint: Path | None, directory: Path,
                         repeats: int = 3) -> tuple[float, int]:
    """The median time of the kit's verified save (atomic, checksummed, fsynced) of a
    state of ``nbytes`` random float32 bytes or of the tensors in ``checkpoint``, into a
    temporary folder inside ``directory`` (so on the file system that matters)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "templates"))
    import torch
    from checkpoint_utils import CheckpointManager

    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    else:
        state = {"weights": torch.rand(max(1, nbytes // 4), dtype=torch.float32)}
    times, size = [], 0
    with tempfile.TemporaryDirectory(prefix=".interval-probe-", dir=directory) as scratch:
        manager = CheckpointManager(scratch, keep=1, keep_time=0)
        for step in range(1, repeats + 1):
            started = time.perf_counter()
            info = manager.save(state, step=step, epoch=0)
            times.append(time.perf_counter() - started)
            size = info.size
    return sorted(times)[len(times) // 2], size


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def advise(save_seconds: float, mtbi: float, restart_seconds: float = 0.0,
           signal_lead: float | None = None, step_seconds: float = 0.0) -> list[str]:
    """The lines of advice printed by the command."""
    best = daly_interval(save_seconds, mtbi)
    lines = [f"save cost C = {human(save_seconds)}, mean time between unannounced "
             f"interruptions M = {human(mtbi)}",
             f"checkpoint every {human(best)} (Daly; Young's sqrt(2*C*M) = "
             f"{human(young_interval(save_seconds, mtbi))})",
             "expected time lost: "
             f"{100 * wasted_fraction(best, save_seconds, mtbi, restart_seconds):.1f}% of the run"]
    for factor in (0.25, 4.0):
        other = best * factor
        lines.append(f"  every {human(other)} instead: "
                     f"{100 * wasted_fraction(other, save_seconds, mtbi, restart_seconds):.1f}%")
    if save_seconds * 10 > mtbi:
        lines.append("WARNING: a save takes more than a tenth of the time between "
                     "interruptions; make the save cheaper (smaller state, faster storage, "
                     "node-local staging) before tuning the interval")
    # After the warning the job finishes its step, saves, and exits: leave 30 s to spare.
    needed = step_seconds + save_seconds + 30
    if signal_lead is not None and needed > signal_lead:
        lines.append(f"WARNING: a step and a save plus 30 s to spare ({human(needed)}) do not "
                     f"fit in the --signal lead time ({human(signal_lead)}): ask for an "
                     f"earlier signal, e.g. --signal=B:USR1@{math.ceil(needed)}")
    elif signal_lead is not None:
        lines.append(f"a step and the emergency save fit in the --signal lead time "
                     f"({human(needed)} with 30 s to spare, of {human(signal_lead)})")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cost = p.add_mutually_exclusive_group(required=True)
    cost.add_argument("--save-seconds", type=parse_duration, help="the cost C of one save")
    cost.add_argument("--measure-bytes", type=parse_bytes,
                      help="measure C: save a state of this size with the kit")
    cost.add_argument("--measure", type=Path, metavar="CHECKPOINT",
                      help="measure C: save the tensors of this checkpoint with the kit")
    p.add_argument("--dir", type=Path, default=Path("."),
                   help="where to measure (your checkpoint folder; default: here)")
    often = p.add_mutually_exclusive_group(required=True)
    often.add_argument("--mtbi", type=parse_duration,
                       help="mean time between interruptions without warning (6h, 2d)")
    often.add_argument("--interruptions-per-day", type=float,
                       help="how many unannounced interruptions a day, on average")
    p.add_argument("--restart", type=parse_duration, default=0.0,
                   help="time to restart and load a checkpoint (default: 0)")
    p.add_argument("--signal-lead", type=parse_duration,
                   help="the T of --signal=B:USR1@T, to check that a save fits in it")
    p.add_argument("--step-seconds", type=parse_duration, default=0.0,
                   help="the time of one training step (the stop waits for the step to end)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    mtbi = args.mtbi if args.mtbi is not None else 86400 / args.interruptions_per_day
    if mtbi <= 0:
        sys.exit("checkpoint_interval: the time between interruptions must be positive")
    save_seconds = args.save_seconds
    if save_seconds is None:
        if not args.dir.is_dir():
            sys.exit(f"checkpoint_interval: --dir {args.dir} is not a folder")
        save_seconds, size = measure_save_seconds(args.measure_bytes, args.measure, args.dir)
        print(f"measured: the kit saves {size / 1e6:.0f} MB into {args.dir} in "
              f"{save_seconds:.2f} s ({size / 1e9 / save_seconds:.2f} GB/s, median of 3)")
    if save_seconds <= 0:
        sys.exit("checkpoint_interval: the save cost must be positive")
    print("\n".join(advise(save_seconds, mtbi, args.restart, args.signal_lead, args.step_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
