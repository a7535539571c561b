"""scripts/bench_checkpoint_io.py runs every way it compares and reports them sanely."""
from __future__ import annotations

import json

import pytest

import bench_checkpoint_io as bench

pytestmark = pytest.mark.integration


def test_transformer_state_has_about_the_size_asked_for():
    for size in (20e6, 300e6):
        assert abs(bench.state_bytes(bench.transformer_state(int(size))) / size - 1) < 0.2


def test_a_small_run_measures_every_way_and_writes_its_report(tmp_path, capsys):
    code = bench.main(["--size", "8MB", "--repeats", "1", "--dir", str(tmp_path / "disk"),
                       "--out", str(tmp_path / "report"), "--keep-page-cache"])
    assert code == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {"raw O_DIRECT write", "torch.save + fsync", "DCP save",
            "kit core: verified save", "kit fast: verified save"} <= set(report["saves"])
    assert {"raw O_DIRECT read", "torch.load", "kit fast: verified load, checked while loading",
            "kit fast, sha256 per chunk (signed markers)"} <= set(report["loads"])
    assert all(seconds > 0 for times in report["saves"].values() for seconds in times)
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| kit fast: verified save |" in table and "x raw O_DIRECT write" in table
    assert "| kit core: verified load, hash then torch.load |" in table
    assert (tmp_path / "report" / "report.png").stat().st_size > 0
    assert list((tmp_path / "disk").iterdir()) == [], "the scratch folder is removed"


def test_report_has_the_async_and_emergency_rows(tmp_path):
    bench.main(["--size", "4MB", "--repeats", "2", "--dir", str(tmp_path / "disk"),
                "--out", str(tmp_path / "report"), "--keep-page-cache", "--signal-lead", "60",
                "--spare", "20"])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    timings = report["async_save"]
    calls = [timings["cold"], *timings["warm"], timings["after_prepare"]]
    assert len(timings["warm"]) == 2 and len(timings["plain_step_s"]) == 2
    assert all(0 < call["blocked_s"] <= call["step_s"] for call in calls)
    assert all(call["step_s"] < call["until_saved_s"] for call in calls[:-1])
    assert timings["prepare_s"] > 0 and min(timings["sync_save_s"]) > 0
    assert 0.5 < timings["state_bytes"] / 4e6 < 2  # weights and moments of about --size
    emergency = report["emergency_save"]
    sync = min(report["saves"]["kit fast: verified save"])
    assert emergency["save_s"] == sync and emergency["fits"] is True
    assert emergency["largest_gb"] == pytest.approx(report["bytes"] / sync * 40 / 1e9)
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| first (cold buffers) |" in table and "| later (warm buffers), best |" in table
    assert "| first after prepare_async_save |" in table
    assert "against real training steps of that model" in table
    assert "fits in 60 s with 20 s to spare? |" in table
    assert f"| {report['bytes'] / 1e6:.0f} MB | {sync:.3f} |" in table
