"""scripts/checkpoint_interval.py: the Young/Daly interval advisor."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

import checkpoint_interval as advisor
from conftest import REPO

SCRIPT = REPO / "scripts" / "checkpoint_interval.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900),
                                           ("6h", 21600), ("1.5d", 129600)])
def test_durations_are_read_with_their_unit(text, seconds):
    assert advisor.parse_duration(text) == seconds


def test_young_interval_is_the_square_root_of_twice_cost_times_mtbi():
    assert advisor.young_interval(20, 21600) == pytest.approx(math.sqrt(864000))


def test_daly_tends_to_young_minus_the_save_when_saves_are_cheap():
    cost, mtbi = 1.0, 1e7
    assert advisor.daly_interval(cost, mtbi) == pytest.approx(
        advisor.young_interval(cost, mtbi) - cost, rel=1e-3)


def test_a_save_longer_than_twice_the_mtbi_means_one_save_per_mtbi():
    assert advisor.daly_interval(500, 200) == 200


@pytest.mark.parametrize("cost, mtbi", [(5, 3600), (60, 86400), (300, 6 * 3600)])
def test_the_recommended_interval_wastes_less_than_its_neighbours(cost, mtbi):
    best = advisor.daly_interval(cost, mtbi)
    waste = advisor.wasted_fraction(best, cost, mtbi)
    for factor in (0.5, 0.8, 1.25, 2.0):
        assert waste < advisor.wasted_fraction(best * factor, cost, mtbi)


def test_a_save_that_does_not_fit_the_signal_lead_time_is_warned_about():
    result = run("--save-seconds", "70", "--step-seconds", "25", "--mtbi", "1d",
                 "--signal-lead", "120")
    assert result.returncode == 0, result.stderr
    assert "do not fit in the --signal lead time" in result.stdout
    assert "--signal=B:USR1@125" in result.stdout  # step + save + 30 s
    fits = run("--save-seconds", "30", "--interruptions-per-day", "2", "--signal-lead", "120")
    assert "fit in the --signal lead time" in fits.stdout and "WARNING" not in fits.stdout


def test_bad_input_gets_a_one_line_error_not_a_traceback():
    result = run("--save-seconds", "ten", "--mtbi", "6h")
    assert result.returncode == 2 and "not a duration: 'ten'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_measuring_saves_with_the_kit_in_the_given_folder(tmp_path):
    result = run("--measure-bytes", "8MB", "--dir", str(tmp_path), "--mtbi", "6h")
    assert result.returncode == 0, result.stderr
    measured = float(result.stdout.split(" in ")[1].split(" s ")[0])
    assert 0 < measured < 10 and "the kit saves 8 MB" in result.stdout
    assert list(tmp_path.iterdir()) == [], "the probe leaves nothing behind"
