"""GPU-ready without a GPU: every PyTorch training script of the kit turns deterministic
algorithms on and sets ``CUBLAS_WORKSPACE_CONFIG`` before its model's first call, where a
GPU run makes its first cuBLAS call; a value the user set is kept. No GPU runs here, so
the probe (tests/cuda_order_probe.py) stops each script at that call on the CPU."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, TEMPLATES, outside_slurm
from interrupted_run import run_ranks

pytestmark = pytest.mark.integration
PROBE = Path(__file__).with_name("cuda_order_probe.py")


def state_at_first_forward(script: Path, tmp_path, python_exe, ranks=1, **env) -> dict:
    """Run ``script`` as ``ranks`` torch.distributed ranks (a plain script ignores them)
    up to its first model call; return what rank 0's probe saw there."""
    command = [python_exe, str(PROBE), str(script), "--ckpt-dir", str(tmp_path / "ckpt")]
    base = {k: v for k, v in outside_slurm().items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    run = run_ranks(command, ranks, env={**base, "OMP_NUM_THREADS": "1", **env}, timeout=120)
    lines = [line for line in run.output if line.startswith("probe: ")]
    assert run.exit_codes == [0] * ranks and lines, "\n".join(run.output[-20:])
    return json.loads(lines[0].removeprefix("probe: "))


@pytest.mark.parametrize("script", [
    TEMPLATES / "train_with_checkpoint.py",
    TEMPLATES / "train_ddp.py",
    TEMPLATES / "train_fsdp.py",
    REPO / "examples" / "existing-script" / "train_lm_resumable.py",
], ids=lambda path: path.name)
def test_cublas_is_configured_before_the_first_forward(script, tmp_path, python_exe):
    if script.parent != TEMPLATES:  # the user's own script, with the kit copied beside it
        for source in (script, TEMPLATES / "checkpoint_utils.py"):
            shutil.copy(source, tmp_path)
        script = tmp_path / script.name
    state = state_at_first_forward(script, tmp_path, python_exe)
    assert state == {"cublas": ":4096:8", "deterministic": True}, (
        f"{script.name} reaches its first forward with {state}: on a GPU, deterministic "
        "cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before that call")


def test_a_workspace_the_user_chose_is_kept(tmp_path, python_exe):
    state = state_at_first_forward(TEMPLATES / "train_with_checkpoint.py", tmp_path,
                                   python_exe, CUBLAS_WORKSPACE_CONFIG=":16:8")
    assert state["cublas"] == ":16:8"
