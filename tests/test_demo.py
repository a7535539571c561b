"""`make demo` end to end, shortened: real signals, resumes, a bitwise verdict, a plot."""
import json
import subprocess

import pytest

from conftest import SCRIPTS

pytestmark = pytest.mark.integration


def test_demo_proves_a_bitwise_identical_resume(tmp_path, python_exe):
    result = subprocess.run(
        [python_exe, str(SCRIPTS / "demo.py"), "--out", str(tmp_path), "--steps", "500",
         "--interruptions", "3", "--seed", "7"],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "bitwise identical to the uninterrupted run" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bitwise_identical"] is True
    signals = [i["signal"] for i in summary["interruptions"]]
    assert "SIGKILL" in signals and len(signals) == 4  # 3 interrupted processes + the last
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
