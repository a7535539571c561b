"""The repository's main demo: train once without interruption, then train again while
a supervisor interrupts the run with real signals (SIGUSR1, SIGTERM, SIGUSR2 and SIGKILL
with no warning) at random steps, resuming after each, and check that both runs end with
bitwise-identical weights.

    make demo                      # or: .venv/bin/python scripts/demo.py
    .venv/bin/python scripts/demo.py --interruptions 8 --seed 3

Writes out/demo/loss.png (both loss curves, interruptions marked) and out/demo/summary.json.
Exit code 0 when the resumed run is bitwise identical to the uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
from pathlib import Path

from compare_checkpoints import checkpoint_differences
from interrupted_run import Interruption, run_until_finished, steps_lost

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "templates" / "train_with_checkpoint.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--interruptions", type=int, default=5)
    p.add_argument("--seed", type=int, default=2026, help="seed of the interruption plan")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def plan_interruptions(count: int, steps: int, seed: int) -> list[Interruption]:
    """Random steps, random signals, always at least one SIGKILL (no warning, no save)."""
    rng = random.Random(seed)
    kinds = [signal.SIGKILL] + [rng.choice([signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2,
                                            signal.SIGKILL]) for _ in range(count - 1)]
    rng.shuffle(kinds)
    at_steps = sorted(rng.sample(range(steps // 20, steps - steps // 20), count))
    return [Interruption(at, sig) for at, sig in zip(at_steps, kinds)]


def training_command(ckpt_dir: Path, steps: int) -> list[str]:
    # --save-every-seconds adds timer checkpoints between the step ones, so kills also land
    # while a save is being written.
    return [sys.executable, str(TRAIN), "--ckpt-dir", str(ckpt_dir), "--steps", str(steps),
            "--save-every-steps", "250", "--save-every-seconds", "0.5", "--log-every", "1",
            "--no-requeue"]


def print_report(reference, attempts, lost, differences) -> None:
    print("\n attempt  signal    sent at step  exit  resumed from  steps lost")
    for i, attempt in enumerate(attempts, 1):
        print(f" {i:>7}  {attempt.signal_name:<8}  {attempt.signal_sent_at_step or '-':>12}"
              f"  {attempt.exit_code:>4}  {attempt.resumed_from:>12}"
              f"  {lost[i - 1] if i <= len(lost) else '-':>10}")
    total = sum(a.seconds for a in attempts)
    saves, loop = reference.save_seconds or 0.0, reference.loop_seconds or float("nan")
    print(f"\nsteps lost per interruption: {lost} (a SIGKILL loses the steps since the last "
          "save; a signal the kit catches loses none)")
    print(f"checkpoint overhead (uninterrupted run): {saves:.2f} s of saving in a "
          f"{loop:.2f} s training loop ({100 * saves / loop:.1f}%)")
    print(f"wall time: uninterrupted {reference.seconds:.1f} s in 1 process; interrupted "
          f"{total:.1f} s in {len(attempts)} processes (each start costs the imports)")
    if differences:
        print("\nfinal weights DIFFER from the uninterrupted run:")
        print("\n".join(f"  {line}" for line in differences[:20]))
    else:
        print("\nfinal state (model, optimizer, scheduler, RNG, data position): "
              "bitwise identical to the uninterrupted run")


def plot(reference, attempts, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps = sorted(reference.losses)
    ax.plot(steps, [reference.losses[s] for s in steps], color="0.75", lw=3,
            label="uninterrupted run")
    for i, attempt in enumerate(attempts, 1):
        own = sorted(attempt.losses)
        ax.plot(own, [attempt.losses[s] for s in own], lw=1, label=f"process {i}")
        if i < len(attempts) and attempts[i].resumed_from < attempt.last_step:
            ax.axvspan(attempts[i].resumed_from, attempt.last_step, color="crimson",
                       alpha=0.12, lw=0, label="steps redone after a SIGKILL")
        if attempt.signal_sent_at_step is not None:
            ax.axvline(attempt.signal_sent_at_step, color="crimson", ls="--", lw=0.8)
            ax.annotate(attempt.signal_name, (attempt.signal_sent_at_step, 1.0),
                        xycoords=("data", "axes fraction"), rotation=90, va="top",
                        ha="right", fontsize=8, color="crimson")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Interrupted and resumed vs uninterrupted: the curves coincide")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per label
    ax.legend(unique.values(), unique.keys(), fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ref_dir, run_dir = args.out / "uninterrupted", args.out / "interrupted"
    for folder in (ref_dir, run_dir):
        if folder.exists():
            for child in folder.iterdir():
                child.unlink()

    print(f"1/3 training {args.steps} steps without interruption ...", flush=True)
    reference = run_until_finished(training_command(ref_dir, args.steps))[0]
    plan = plan_interruptions(args.interruptions, args.steps, args.seed)
    print("2/3 training again, interrupted by: " + ", ".join(
        f"{signal.Signals(i.signal).name}@{i.at_step}" for i in plan), flush=True)
    attempts = run_until_finished(training_command(run_dir, args.steps), plan)
    lost = steps_lost(attempts)

    print("3/3 comparing the final checkpoints bitwise ...", flush=True)
    differences = checkpoint_differences(ref_dir / "last.pt", run_dir / "last.pt")
    # Every step the interrupted run trained, redone or not, must match the reference.
    loss_mismatches = [(s, loss) for a in attempts for s, loss in a.losses.items()
                       if reference.losses.get(s) != loss]
    if loss_mismatches:
        differences.append(f"{len(loss_mismatches)} logged losses differ, first at step "
                           f"{loss_mismatches[0][0]}")
    print_report(reference, attempts, lost, differences)

    summary = {
        "steps": args.steps, "seed": args.seed, "bitwise_identical": not differences,
        "differences": differences, "steps_lost": lost,
        "interruptions": [{"signal": a.signal_name, "sent_at_step": a.signal_sent_at_step,
                           "exit_code": a.exit_code, "resumed_from": a.resumed_from}
                          for a in attempts],
        "uninterrupted_seconds": reference.seconds,
        "checkpoint_save_seconds": reference.save_seconds,
        "training_loop_seconds": reference.loop_seconds,
        "interrupted_seconds": sum(a.seconds for a in attempts),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.no_plot:
        plot(reference, attempts, args.out / "loss.png")
        print(f"plot: {args.out / 'loss.png'}")
    return 0 if not differences else 1


if __name__ == "__main__":
    sys.exit(main())
