"""The fault-injection bench (scripts/chaos_bench.py) against the real templates: every kind
of fault, at random steps, and every run still ends bitwise identical to one that was never
interrupted. The seed of each bench run is in its report, printed when a test fails."""
from __future__ import annotations

import json
import random
import shutil
import signal
import sys
import time

import pytest

import chaos_bench
from checkpoint_utils import (CheckpointManager, CorruptCheckpointError, read_marker,
                              verify_checkpoint)
from conftest import TEMPLATES

pytestmark = pytest.mark.chaos

# Caught signals save at the end of the step they arrived in: nothing is redone.
NOTHING_LOST = ("signal", "signal-in-save", "double-signal")


def template_command(python: str, script: str, steps: int) -> list[str]:
    return [python, str(TEMPLATES / script), "--ckpt-dir", "{ckpt_dir}", "--steps", str(steps),
            "--save-every-steps", "30", "--log-every", "1", "--no-requeue"]


def run_bench(tmp_path, capsys, *options: str) -> dict:
    report = tmp_path / "report.json"
    code = chaos_bench.main(["--json", str(report), "--timeout", "90", *options])
    printed = capsys.readouterr().out
    assert report.exists(), printed
    result = json.loads(report.read_text())
    result["exit_code"], result["printed"] = code, printed
    return result


def assert_survived(result: dict, kinds: tuple[str, ...]) -> None:
    summary, printed = result["summary"], result["printed"]
    assert result["exit_code"] == 0 and summary["problems"] == 0, printed
    assert summary["mismatches"] == 0, printed
    assert all(run["matches"] for run in result["runs"]), printed
    ran = {f["kind"] for run in result["runs"] for f in run["faults"]}
    assert ran == set(kinds) - set(summary["skipped_kinds"]), printed
    for run in result["runs"]:
        for fault in run["faults"]:
            assert fault["landed"], f"{fault}\n{printed}"
            if fault["kind"] in NOTHING_LOST:  # None: the run finished with that process
                assert fault["steps_lost"] in (0, None), f"{fault}\n{printed}"


@pytest.mark.integration
def test_single_process_template_survives_every_kind_of_fault(tmp_path, capsys, python_exe):
    kinds = tuple(k for k in chaos_bench.KINDS if k not in chaos_bench.NODE_KINDS)
    # --amp: an enabled GradScaler has state of its own, which must come back too.
    result = run_bench(tmp_path, capsys, "--faults", str(len(kinds)), "--faults-per-run",
                       str(len(kinds)), "--kinds", ",".join(kinds),
                       "--", *template_command(python_exe, "train_with_checkpoint.py", 240),
                       "--amp")
    assert_survived(result, kinds)


@pytest.mark.integration
@pytest.mark.distributed
def test_ddp_template_survives_faults_on_two_ranks(tmp_path, capsys, python_exe):
    kinds = ("kill-in-save", "signal", "double-signal", "corrupt")
    result = run_bench(tmp_path, capsys, "--ranks", "2", "--faults", "4", "--faults-per-run",
                       "4", "--kinds", ",".join(kinds),
                       "--", *template_command(python_exe, "train_ddp.py", 160))
    assert_survived(result, kinds)


@pytest.mark.integration
@pytest.mark.distributed
def test_ddp_template_survives_a_node_that_dies_and_one_that_freezes(tmp_path, capsys,
                                                                     python_exe):
    """Two ranks on two nodes: every rank of one node killed, or frozen. The rank on the
    other node exits 6 (another rank is gone / named by its watchdog within 3 s), and
    the next start, on both nodes again, ends bitwise identical."""
    kinds = chaos_bench.NODE_KINDS
    result = run_bench(tmp_path, capsys, "--ranks", "2", "--nodes", "2", "--faults", "2",
                       "--faults-per-run", "2", "--kinds", ",".join(kinds),
                       "--", *template_command(python_exe, "train_ddp.py", 160),
                       "--peer-timeout", "3")
    assert_survived(result, kinds)
    survivors = [code for run in result["runs"] for f in run["faults"]
                 for code in f["exit_codes"] if code != -signal.SIGKILL]
    assert chaos_bench.EXIT_PEER_LOST in survivors, result["printed"]


@pytest.mark.integration
def test_bench_catches_a_resume_that_forgets_the_rng(tmp_path, capsys, python_exe):
    """The bench has teeth: with a kit whose restore_rng_state does nothing, the resumed
    runs draw other dropout masks, and the bench reports the mismatch and exits 1."""
    kit = tmp_path / "kit"
    shutil.copytree(TEMPLATES, kit, ignore=shutil.ignore_patterns("__pycache__"))
    source = (kit / "checkpoint_utils.py").read_text()
    marker = "def restore_rng_state(state: dict) -> None:\n"
    assert marker in source, "restore_rng_state changed its signature: update this test"
    (kit / "checkpoint_utils.py").write_text(
        source.replace(marker, marker + "    return  # the mistake under test\n"))
    command = template_command(python_exe, "train_with_checkpoint.py", 120)
    command[1] = str(kit / "train_with_checkpoint.py")
    result = run_bench(tmp_path, capsys, "--faults", "2", "--kinds", "signal", "--", *command)
    assert result["exit_code"] == 1, result["printed"]
    assert result["summary"]["mismatches"] == 1, result["printed"]
    assert "final state differs" in result["runs"][0]["problem"]


@pytest.mark.parametrize("how", chaos_bench.CORRUPTIONS)
def test_each_corruption_makes_the_newest_checkpoint_invalid(how, tmp_path):
    manager = CheckpointManager(tmp_path, keep=5)
    for step in (10, 20):
        manager.save({"step": step, "weights": list(range(1000))}, step=step, epoch=0)
    damaged = chaos_bench.corrupt_newest_checkpoint(tmp_path, how)
    assert "00000020" in damaged
    with pytest.raises(CorruptCheckpointError):
        verify_checkpoint(read_marker(tmp_path / "step_00000020.pt"))
    verify_checkpoint(read_marker(tmp_path / "step_00000010.pt"))  # the one before is untouched


def test_save_watcher_fires_on_an_in_flight_save_only_once_armed(tmp_path):
    fired = []
    watcher = chaos_bench.SaveWatcher(tmp_path, lambda: fired.append(time.monotonic()))
    try:
        (tmp_path / ".tmp-before-arming").touch()
        time.sleep(0.2)
        assert fired == []
        (tmp_path / ".tmp-before-arming").unlink()  # that save ended before arming
        watcher.arm()
        (tmp_path / "step_00000010.pt").touch()  # a finished file is not a save in flight
        created = time.monotonic()
        (tmp_path / ".tmp-step_00000020.pt.123").touch()
        deadline = time.monotonic() + 2
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(fired) == 1 and fired[0] - created < 0.5
    finally:
        watcher.close()


def test_save_watcher_armed_during_a_save_fires_at_once(tmp_path):
    """Arming on the step that saves races the save: its file may already exist."""
    fired = []
    watcher = chaos_bench.SaveWatcher(tmp_path, lambda: fired.append(True))
    try:
        (tmp_path / ".tmp-step_00000030.pt.99").touch()
        time.sleep(0.2)
        watcher.arm()
        (tmp_path / ".tmp-step_00000060.pt.99").touch()
        time.sleep(0.2)
        assert fired == [True]
    finally:
        watcher.close()


def test_fault_steps_leave_every_fault_a_run_to_hit():
    ref = chaos_bench.Reference(final=None, total_steps=240, startup_seconds=1,
                                save_seconds=0.01, save_every=35)
    # A kill waiting for the save after step 220 may hit the last one: nothing after it.
    assert not chaos_bench.leaves_a_run_to_hit([(220, "kill-in-save"), (230, "signal")], ref)
    assert chaos_bench.leaves_a_run_to_hit([(150, "kill-in-save"), (160, "signal")], ref)
    assert not chaos_bench.leaves_a_run_to_hit([(240, "signal")], ref)
    # A full disk may show only at the final save: a start after it resumes from step 205
    # at worst, and a kill waiting for the next save then meets the final one.
    assert not chaos_bench.leaves_a_run_to_hit(
        [(105, "disk-full"), (150, "kill-in-save"), (160, "signal")], ref)
    assert chaos_bench.leaves_a_run_to_hit(
        [(105, "kill-in-save"), (150, "signal"), (160, "disk-full")], ref)
    rng = random.Random(3)
    kinds = chaos_bench.storage_faults_last(list(chaos_bench.KINDS) * 2)
    for _ in range(50):
        plan = list(zip(chaos_bench.draw_fault_steps(rng, kinds, ref), kinds))
        assert chaos_bench.leaves_a_run_to_hit(plan, ref)


def test_disk_full_fault_fills_the_file_system(tmp_path):
    folder = tmp_path / "small"
    reason = chaos_bench.mount_tmpfs(folder, "2M")
    if reason:
        pytest.skip(reason)
    try:
        assert chaos_bench.fill_file_system(folder)
        with pytest.raises(OSError):
            (folder / "checkpoint").write_bytes(b"x" * 100_000)
    finally:
        chaos_bench.unmount(folder)


def test_command_without_the_checkpoint_placeholder_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        chaos_bench.parse_args(["--", sys.executable, "train.py", "--ckpt-dir", "ckpt"])
    assert stop.value.code == 2
    assert "{ckpt_dir}" in capsys.readouterr().err


def test_expected_exit_codes_follow_the_fault():
    assert chaos_bench.Fault(5, signal.SIGKILL, kind="kill").expected_exit_codes() == {
        0, -signal.SIGKILL}
    assert 75 in chaos_bench.Fault(5, signal.SIGUSR1, kind="signal").expected_exit_codes()
    assert chaos_bench.Fault(5, signal.SIGUSR1, kind="disk-full").expected_exit_codes() is None
